"""Idempotent retries: a site asked again for a round it already answered re-sends that answer.

A coordinator that restarts (or a network that retries) asks for a round again. Training again
would draw new DP noise and spend ε a second time for a release the coordinator already has (the
first reply left) — and it would make the update depend on how often it was asked. So each reply
a site produces is kept in its state folder *before* it leaves, keyed by (message kind, server
round, the model it answers); a repeat of the same question gets the same bytes back, with no
new noise and no new charge.

A charge whose reply was never kept (the site died between paying and replying) paid for a
release that never left the site; the retry may reuse it instead of paying again, because the
first result was never seen by anyone (:func:`paid_but_unsent`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict


class ReplyCache:
    """The replies one site produced in one run, one file per (kind, round)."""

    def __init__(self, folder: Path, *, durable: bool = True) -> None:
        self.folder = folder
        #: fsync each reply before it leaves. A virtual site skips it: the machine whose crash
        #: would lose the file takes the whole simulation with it (100 fsyncs a round cost
        #: more than a tiny model's training).
        self.durable = durable

    def _path(self, kind: str, server_round: int) -> Path:
        return self.folder / f"{kind.replace('.', '-')}-{server_round:05d}.reply"

    def has(self, kind: str, server_round: int) -> bool:
        """Whether a reply to this round left (or was about to leave) the site."""
        return self._path(kind, server_round).exists()

    def lookup(self, kind: str, server_round: int, base: str) -> RecordDict | None:
        """The reply kept for this round if it answered the same model ``base``, else None."""
        path = self._path(kind, server_round)
        if not path.exists():
            return None
        data = path.read_bytes()
        key, payload = data[:64].decode(), data[64:]
        if key != _key(base):
            return None  # the round is asked about another model: a new question
        return recorddict_from_proto(ProtoRecordDict.FromString(payload))

    def store(self, kind: str, server_round: int, base: str, content: RecordDict) -> None:
        """Keep ``content`` (fsync'd, renamed into place) before it is sent."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(kind, server_round)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_key(base).encode() + recorddict_to_proto(content).SerializeToString())
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)


def _key(base: str) -> str:
    return hashlib.sha256(base.encode()).hexdigest()


def paid_but_unsent(ledger, *, run_id: str, server_round: int, mechanism: str, release) -> bool:
    """Whether this round's release is already in the ledger while no reply of it was kept.

    Then the first computation died before its result could leave the site: nothing was
    released, and the retry reuses that charge (the ledger stays append-only and exact).
    """
    return any(
        entry.server_round == server_round
        and entry.mechanism == mechanism
        and entry.release == release
        for entry in ledger.entries(run_id=run_id)
    )
