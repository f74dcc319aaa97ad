"""Faults on demand: make a virtual site misbehave in exactly one way, in exactly one round.

An experiment's ``[[simulation.faults]]`` table (``site`` = the virtual site's index, ``round`` =
the server round, ``kind``) rehearses what a real site or network does to a federation, through
the real ServerApp and ClientApp — so anyone can check what their setup does with a NaN update,
a corrupted ciphertext, a duplicate or stale reply, a site that drops out or one that crashes:

* ``nan``, ``bitflip``, ``crash`` happen *at the site*: :func:`faulty_client_app` wraps fedcl's
  ClientApp and corrupts (or raises instead of) that site's reply. ``nan`` replaces its weights
  by NaNs; ``bitflip`` flips one bit in the middle of its update's bytes (a float's exponent in
  plaintext, a ciphertext byte under HE).
* ``duplicate``, ``stale``, ``disconnect`` happen *on the way*: :class:`FaultyGrid` wraps the
  coordinator's Grid, delivering that site's reply twice, replacing it by the site's reply of the
  round before, or hiding the site (it neither appears as connected nor answers) for ``rounds``
  rounds, after which it comes back. Sites are recognised by the ``site-<index>`` names that
  ``fedcl simulate`` gives its virtual sites, so a disconnect needs the site to have answered
  once before (``round`` ≥ 2).

Simulations only: nothing here is imported by a deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedcl.config import protocol as P
from fedcl.config.experiment import FaultSpec

logger = logging.getLogger("fedcl.simulations")

SITE_SIDE = ("nan", "bitflip", "crash")
NETWORK_SIDE = ("duplicate", "stale", "disconnect")


class InjectedCrash(RuntimeError):
    """The ``crash`` fault: a ClientApp that dies (Flower reports it as an error reply)."""


def _kinds(faults: Sequence[FaultSpec], site: int, server_round: int, side: Sequence[str]):
    return {f.kind for f in faults if f.site == site and f.round == server_round and f.kind in side}


def _round_of(msg: Message) -> int:
    config = msg.content.config_records.get(P.CONFIG)
    return int(config[P.SERVER_ROUND]) if config and P.SERVER_ROUND in config else -1


def flip_middle_bit(array: Array, *, floats: bool) -> Array:
    """``array`` with one bit flipped in the middle of its values.

    For float32 weights the flipped bit is the exponent's highest one of the middle value, so it
    changes by a factor of about 2^128 (the way a flipped bit in memory ruins a model); for
    ciphertext bytes it is the lowest bit of the middle byte.
    """
    if floats:
        values = array.numpy().astype(np.float32).copy()
        bits = values.reshape(-1).view(np.uint32)
        bits[bits.size // 2] ^= np.uint32(1 << 30)
        return Array(values)
    data = bytearray(array.data)
    data[_middle_of_middle_ciphertext(data)] ^= 0x01
    return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=bytes(data))


def _middle_of_middle_ciphertext(data: bytearray) -> int:
    """The middle byte of the ciphertext that holds the Array's middle byte: inside its data,
    never a length frame (``fedcl.privacy.ckks.framing``; with an even number of equal blocks
    the Array's middle byte would be the next frame's length)."""
    from fedcl.privacy.ckks.framing import FRAME

    middle, pos = len(data) // 2, 0
    while pos + FRAME.size <= len(data):
        (length,) = FRAME.unpack_from(data, pos)
        start, end = pos + FRAME.size, pos + FRAME.size + length
        if middle < end or end >= len(data):
            return start + length // 2 if end <= len(data) else middle
        pos = end
    return middle


def corrupt_reply(reply: Message, kind: str) -> Message:
    """Apply a site-side fault to a real reply (its update record, ``arrays`` or ``fisher``)."""
    content = reply.content
    key = P.ARRAYS if P.ARRAYS in content.array_records else P.FISHER
    record = content.array_records.get(key)
    if record is None:
        return reply  # a refusal or a failure carries no update to corrupt
    encrypted = P.meta_key(key) in content.config_records
    if kind == "nan":
        content[key] = ArrayRecord(
            {
                name: Array(np.full(tuple(arr.shape), np.nan, dtype=np.float32))
                for name, arr in record.items()
            }
        )
    elif kind == "bitflip":
        name = next(iter(record.keys()))
        arrays = dict(record.items())
        arrays[name] = flip_middle_bit(arrays[name], floats=not encrypted)
        content[key] = ArrayRecord(arrays)
    return reply


def faulty_client_app(faults: Sequence[FaultSpec]) -> ClientApp:
    """fedcl's ClientApp, with the site-side faults of ``faults`` applied to its replies."""
    from fedcl.client import app as real

    app = ClientApp()

    def run(handler, msg: Message, context: Context) -> Message:
        site = int(context.node_config.get("partition-id", -1))
        kinds = _kinds(faults, site, _round_of(msg), SITE_SIDE)
        if "crash" in kinds:
            raise InjectedCrash(f"site-{site}: injected crash in round {_round_of(msg)}")
        reply = handler(msg, context)
        for kind in sorted(kinds):
            logger.warning("site-%d round %d: injecting %s", site, _round_of(msg), kind)
            reply = corrupt_reply(reply, kind)
        return reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run(real.train, msg, context)

    @app.train("consolidate")
    def consolidate(msg: Message, context: Context) -> Message:
        return run(real.consolidate, msg, context)

    @app.query("verify")
    def verify(msg: Message, context: Context) -> Message:
        return real.verify_group(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real.evaluate_tasks(msg, context)  # faults hit a site's update, not its scores

    return app


class FaultyGrid:
    """A Grid that duplicates, replays or withholds the replies of chosen virtual sites."""

    def __init__(self, grid: Grid, faults: Sequence[FaultSpec]) -> None:
        self._grid = grid
        self._faults = [f for f in faults if f.kind in NETWORK_SIDE]
        self._nodes: dict[int, int] = {}  # virtual site index -> node id, learnt from replies
        #: node id -> server round -> its train reply (the latest of that round: a round may
        #: be sent twice, after a corrupt aggregate was repaired)
        self._replies: dict[int, dict[int, Message]] = {}
        self._round = 0  # the server round of the messages being answered
        self._upcoming = 1  # the round a site that disconnects is gone for, from its start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _away(self, server_round: int) -> set[int]:
        """Node ids of the sites that are disconnected in ``server_round``."""
        return {
            self._nodes[f.site]
            for f in self._faults
            if f.kind == "disconnect"
            and f.round <= server_round < f.round + f.rounds
            and f.site in self._nodes
        }

    def get_node_ids(self) -> Iterable[int]:
        away = self._away(self._upcoming)
        return [n for n in self._grid.get_node_ids() if n not in away]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        if messages:
            self._round = _round_of(messages[0])
            # After a round's evaluation (or a consolidation) the next round is about to start;
            # with evaluation.mode = "with_train" a train message (it asks for an evaluation of
            # the model it carries) is its round's last.
            first = messages[0]
            config = first.content.config_records.get(P.CONFIG) or {}
            last = first.metadata.message_type in ("evaluate", P.CONSOLIDATE) or (
                first.metadata.message_type == "train" and P.EVALUATE_ROUND in config
            )
            self._upcoming = self._round + 1 if last else self._round
        away = self._away(self._round)
        replies = list(
            self._grid.send_and_receive(
                [m for m in messages if m.metadata.dst_node_id not in away], timeout=timeout
            )
        )
        out = []
        for reply in replies:
            node = reply.metadata.src_node_id
            site = self._site_of(reply)
            kinds = _kinds(self._faults, site, self._round, NETWORK_SIDE) if site >= 0 else set()
            train = reply.metadata.message_type == "train"
            earlier = [r for r in self._replies.get(node, {}) if r < self._round]
            if "stale" in kinds and earlier:
                logger.warning("site-%d round %d: replaying its previous reply", site, self._round)
                out.append(self._replies[node][max(earlier)])  # the round before's
            else:
                out.append(reply)
            if "duplicate" in kinds:
                logger.warning("site-%d round %d: delivering its reply twice", site, self._round)
                out.append(reply)
            if train and not reply.has_error():
                self._replies.setdefault(node, {})[self._round] = reply
        return out

    def _site_of(self, reply: Message) -> int:
        """The virtual site index a reply comes from (``site-<index>``), learnt once per node."""
        node = reply.metadata.src_node_id
        if not reply.has_error():
            site = reply.content.config_records.get(P.SITE)
            name = str(site.get(P.SITE_ID, "")) if site else ""
            if name.startswith("site-") and name[5:].isdigit():
                self._nodes[int(name[5:])] = node
        return next((i for i, n in self._nodes.items() if n == node), -1)
