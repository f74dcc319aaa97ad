"""The coordinator's block-wise ciphertext sum of validated replies (public context only)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from .errors import ReplyRejected
from .framing import blocks_to_record
from .meta import KIND_AGGREGATE, WireMeta
from .validate import ExpectedReply, load_reply


class EncryptedSum:
    """Block-wise ciphertext sum of validated replies; never needs a secret key.

    A reply is validated completely before any of it is added, so a bad one leaves the sum of
    the others intact; memory is the running sum plus one reply.
    """

    def __init__(self, expected: ExpectedReply) -> None:
        self.expected = expected
        self.count = 0
        self._acc: list | None = None
        self._seen: set[bytes] = set()

    def add(self, arrays: ArrayRecord | None, meta: Mapping[str, Any] | None) -> None:
        if self.count >= self.expected.packing.max_sites:
            raise ReplyRejected(
                f"already {self.count} updates summed, the packing's headroom (he.max_sites) "
                "allows no more"
            )
        vectors, first = load_reply(arrays, meta, self.expected)
        # Fresh encryptions have independent noise that grows with sqrt(K); the same ciphertext
        # added twice grows it linearly and can break exactness, so a replay is refused.
        digest = hashlib.sha256(first).digest()
        if digest in self._seen:
            raise ReplyRejected("the same ciphertext as an update already summed (a replay)")
        self._seen.add(digest)
        if self._acc is None:
            self._acc = vectors
        else:
            for acc, vec in zip(self._acc, vectors, strict=True):
                acc.add_(vec)
        self.count += 1

    def result(self) -> tuple[ArrayRecord, ConfigRecord]:
        if self._acc is None:
            raise ValueError("nothing was summed")
        e = self.expected
        meta = WireMeta(
            kind=KIND_AGGREGATE,
            fingerprint=e.fingerprint,
            layout_hash=e.layout_hash,
            num_values=e.num_values,
            num_blocks=len(self._acc),
            per_array=e.per_array,
            slots=e.params.block_values,
            packing=e.packing,
            scale_bits=e.scale_bits,
            base_sha256=e.base_sha256 or "",
            summed=self.count,
        )
        blocks = [v.serialize() for v in self._acc]
        return blocks_to_record(blocks, e.per_array), meta.to_record()
