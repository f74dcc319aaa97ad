"""The encrypted wire format (DESIGN.md §5): blocks in an ArrayRecord, metadata in a ConfigRecord.

A site's reply (and the coordinator's aggregate) carries:

* ``content["arrays"]``: an ``ArrayRecord`` whose entries ``ckks-000000``, ``ckks-000001``, … are
  raw-bytes ``Array(dtype="uint8", shape=(n,), stype="ckks", data=...)``. Each Array carries up to
  ``blocks_per_array`` serialized 2048-slot ciphertexts, each framed as a 4-byte little-endian
  length and the bytes, so one Array stays just under Flower's 5 MiB chunk. Why group: Flower
  pushes every Array and every chunk as its own object, one request each, two at a time; one
  Array per ciphertext made 5,473 objects for ResNet-18-GN, grouping makes 87 (same bytes).
* ``content["ckks"]``: a ``ConfigRecord`` with the format version, kind (update/aggregate), the
  context fingerprint, the layout hash, the number of values and blocks, the packing parameters
  and the scale, the SHA-256 of the model the update was computed from, and for an aggregate the
  number of updates summed. It never carries an example count: those are only in ciphertext.

The coordinator validates every reply against an :class:`ExpectedReply` built from the *public*
context, and adds ciphertexts block-wise with :class:`EncryptedSum`. A site decodes an aggregate
with :func:`decode_aggregate`, which checks that the decrypted contributor count equals the
metadata's, so a tampered or corrupt aggregate is refused rather than applied.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from .codec import DecodedSum, EncodeStats, Layout, Packing, decode_blocks, encode_blocks
from .errors import AggregateError, ReplyRejected
from .keys import fingerprint, short
from .params import CKKSParams, params_of

FORMAT_VERSION = 1
META_KEY = "ckks"  # RecordDict key of the metadata ConfigRecord
BLOCK_STYPE = "ckks"
BLOCK_PREFIX = "ckks-"
#: Bytes of ciphertext per Array: one Flower chunk (5 MiB) with room for framing.
ARRAY_TARGET_BYTES = 4 << 20
FRAME = struct.Struct("<I")
KIND_UPDATE = "update"
KIND_AGGREGATE = "aggregate"
#: Serialized ciphertexts of one parameter set differ by a byte or two (protobuf varints).
BLOCK_BYTES_TOLERANCE = 64

# Keys of the metadata ConfigRecord.
FORMAT = "ckks-format"
KIND = "ckks-kind"
FINGERPRINT = "ckks-fingerprint"
LAYOUT = "ckks-layout"
VALUES = "ckks-values"
BLOCKS = "ckks-blocks"
SLOTS = "ckks-slots"
BITS = "ckks-bits"
VALUES_PER_SLOT = "ckks-values-per-slot"
MAX_SITES = "ckks-max-sites"
CLIP = "ckks-clip"
MAX_EXAMPLES = "ckks-max-examples"
SCALE_BITS = "ckks-scale-bits"
BASE = "ckks-base"
SUMMED = "ckks-summed"
PER_ARRAY = "ckks-blocks-per-array"


def block_key(index: int) -> str:
    """Key of the ``index``-th Array (a group of ciphertexts) in the ArrayRecord."""
    return f"{BLOCK_PREFIX}{index:06d}"


def blocks_per_array(params: CKKSParams) -> int:
    """How many ciphertexts of ``params`` fill one Array of about 4 MiB."""
    block = 2 * params.poly_modulus_degree * 8 * params.data_primes + 256
    return max(1, ARRAY_TARGET_BYTES // block)


@dataclass(frozen=True)
class WireMeta:
    """The metadata ConfigRecord, parsed."""

    kind: str
    fingerprint: str
    layout_hash: str
    num_values: int
    num_blocks: int
    slots: int
    packing: Packing
    scale_bits: int
    per_array: int = 1
    base_sha256: str = ""
    summed: int = 0

    def to_record(self) -> ConfigRecord:
        p = self.packing
        rec: dict[str, Any] = {
            FORMAT: FORMAT_VERSION,
            KIND: self.kind,
            FINGERPRINT: self.fingerprint,
            LAYOUT: self.layout_hash,
            VALUES: self.num_values,
            BLOCKS: self.num_blocks,
            PER_ARRAY: self.per_array,
            SLOTS: self.slots,
            BITS: p.bits,
            VALUES_PER_SLOT: p.values_per_slot,
            MAX_SITES: p.max_sites,
            CLIP: float(p.clip),
            MAX_EXAMPLES: p.max_examples,
            SCALE_BITS: self.scale_bits,
            BASE: self.base_sha256,
        }
        if self.kind == KIND_AGGREGATE:
            rec[SUMMED] = self.summed
        return ConfigRecord(rec)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.to_record())

    @classmethod
    def from_record(cls, rec: Mapping[str, Any] | None) -> WireMeta:
        """Parse; a ``ValueError`` names the missing or malformed key."""
        if rec is None:
            raise ValueError(
                f"no '{META_KEY}' metadata record (a plaintext reply in an encrypted round?)"
            )
        try:
            version = int(rec[FORMAT])
            if version != FORMAT_VERSION:
                raise ValueError(f"wire format version {version}, expected {FORMAT_VERSION}")
            kind = str(rec[KIND])
            if kind not in (KIND_UPDATE, KIND_AGGREGATE):
                raise ValueError(f"unknown kind {kind!r}")
            packing = Packing(
                bits=int(rec[BITS]),
                values_per_slot=int(rec[VALUES_PER_SLOT]),
                max_sites=int(rec[MAX_SITES]),
                clip=float(rec[CLIP]),
                max_examples=int(rec[MAX_EXAMPLES]),
            )
            return cls(
                kind=kind,
                fingerprint=str(rec[FINGERPRINT]),
                layout_hash=str(rec[LAYOUT]),
                num_values=int(rec[VALUES]),
                num_blocks=int(rec[BLOCKS]),
                per_array=int(rec[PER_ARRAY]),
                slots=int(rec[SLOTS]),
                packing=packing,
                scale_bits=int(rec[SCALE_BITS]),
                base_sha256=str(rec.get(BASE, "") or ""),
                summed=int(rec.get(SUMMED, 0) or 0),
            )
        except KeyError as exc:
            raise ValueError(f"metadata lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed metadata: {exc}") from None


def blocks_to_record(blocks: list[bytes], per_array: int) -> ArrayRecord:
    """Raw-bytes Arrays of ``per_array`` length-framed ciphertexts each, in block order."""
    arrays = {}
    for index, start in enumerate(range(0, len(blocks), per_array)):
        data = b"".join(FRAME.pack(len(b)) + b for b in blocks[start : start + per_array])
        arrays[block_key(index)] = Array(
            dtype="uint8", shape=(len(data),), stype=BLOCK_STYPE, data=data
        )
    return ArrayRecord(arrays)


def record_blocks(arrays: ArrayRecord, num_blocks: int, per_array: int) -> list[bytes]:
    """The ciphertexts of a record in order; ``ValueError`` for anything malformed."""
    num_arrays = -(-num_blocks // per_array)
    names = [block_key(i) for i in range(num_arrays)]
    keys = list(arrays.keys())
    if sorted(keys) != names:
        unexpected = sorted(set(keys) - set(names))[:3]
        raise ValueError(
            f"{len(keys)} array entries, expected {num_arrays} ({num_blocks} blocks, "
            f"{per_array} per array)" + (f"; unexpected {unexpected}" if unexpected else "")
        )
    out: list[bytes] = []
    for index, name in enumerate(names):
        arr = arrays[name]
        if arr.stype != BLOCK_STYPE or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
            raise ValueError(
                f"entry {name} is not raw CKKS data (stype={arr.stype!r}, dtype={arr.dtype!r}, "
                f"shape={tuple(arr.shape)}, {len(arr.data)} bytes)"
            )
        data = memoryview(arr.data)
        want = min(per_array, num_blocks - index * per_array)
        pos, got = 0, 0
        while pos < len(data):
            if pos + FRAME.size > len(data):
                raise ValueError(f"entry {name} ends inside a block header")
            (size,) = FRAME.unpack_from(data, pos)
            pos += FRAME.size
            if pos + size > len(data):
                raise ValueError(f"entry {name}: block {len(out)} is truncated")
            out.append(bytes(data[pos : pos + size]))
            pos += size
            got += 1
        if got != want:
            raise ValueError(f"entry {name} holds {got} blocks, expected {want}")
    return out


# --- site side: encode -----------------------------------------------------------------------
@dataclass
class EncryptedUpdate:
    arrays: ArrayRecord
    meta: ConfigRecord
    stats: EncodeStats


def encrypt_update(
    delta: Mapping[str, Any],
    num_examples: int,
    ctx,
    packing: Packing,
    *,
    layout: Layout | None = None,
    base_sha256: str = "",
    rng: np.random.Generator | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> EncryptedUpdate:
    """A site's reply payload: Δ weighted by ``num_examples``, encrypted, plus site-local stats."""
    enc = encode_blocks(
        delta,
        num_examples,
        ctx,
        packing,
        layout=layout,
        rng=rng,
        workers=workers,
        parallel_min_blocks=parallel_min_blocks,
    )
    params = params_of(ctx)
    meta = WireMeta(
        kind=KIND_UPDATE,
        fingerprint=fingerprint(ctx),
        layout_hash=enc.layout.hash,
        num_values=enc.layout.num_values,
        num_blocks=len(enc.blocks),
        per_array=blocks_per_array(params),
        slots=params.slots,
        packing=packing,
        scale_bits=enc.scale_bits,
        base_sha256=base_sha256,
    )
    arrays = blocks_to_record(enc.blocks, meta.per_array)
    return EncryptedUpdate(arrays, meta.to_record(), enc.stats)


# --- coordinator side: validate and add ---------------------------------------------------------
@dataclass(frozen=True)
class ExpectedReply:
    """What a valid reply looks like this round, derived from the public context alone."""

    ctx: Any  # the public TenSEAL context
    fingerprint: str
    layout_hash: str
    num_values: int
    packing: Packing
    params: CKKSParams
    scale_bits: int
    block_bytes: int
    base_sha256: str | None = None

    @classmethod
    def build(
        cls, public_ctx, packing: Packing, layout: Layout, *, base_sha256: str | None = None
    ) -> ExpectedReply:
        import tenseal as ts

        params = params_of(public_ctx)
        scale_bits = packing.scale_bits(params)  # CKKSConfigError now, not at the first reply
        probe = ts.ckks_vector(public_ctx, [0.0], scale=float(2**scale_bits)).serialize()
        return cls(
            ctx=public_ctx,
            fingerprint=fingerprint(public_ctx),
            layout_hash=layout.hash,
            num_values=layout.num_values,
            packing=packing,
            params=params,
            scale_bits=scale_bits,
            block_bytes=len(probe),
            base_sha256=base_sha256,
        )

    def with_base(self, base_sha256: str | None) -> ExpectedReply:
        return replace(self, base_sha256=base_sha256)

    @property
    def block_lengths(self) -> list[int]:
        return self.packing.block_lengths(self.num_values, self.params)

    @property
    def num_blocks(self) -> int:
        return self.packing.num_blocks(self.num_values, self.params)

    @property
    def per_array(self) -> int:
        return blocks_per_array(self.params)


def check_meta(meta: Mapping[str, Any] | None, expected: ExpectedReply) -> WireMeta:
    """Parse and check a reply's metadata (cheap: run it before touching any ciphertext)."""
    try:
        m = WireMeta.from_record(meta)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    if m.kind != KIND_UPDATE:
        raise ReplyRejected(f"kind {m.kind!r}, expected {KIND_UPDATE!r}")
    if m.fingerprint != expected.fingerprint:
        raise ReplyRejected(
            f"context fingerprint {short(m.fingerprint)}… is not the federation's "
            f"{short(expected.fingerprint)}… (the site uses other keys)"
        )
    if m.layout_hash != expected.layout_hash or m.num_values != expected.num_values:
        raise ReplyRejected(
            f"layout {short(m.layout_hash)}… ({m.num_values} values) is not the model's "
            f"{short(expected.layout_hash)}… ({expected.num_values} values)"
        )
    if (
        m.packing != expected.packing
        or m.scale_bits != expected.scale_bits
        or m.slots != expected.params.slots
    ):
        raise ReplyRejected(
            f"packing {m.packing} at scale 2^{m.scale_bits} differs from the experiment's "
            f"{expected.packing} at 2^{expected.scale_bits}"
        )
    if m.num_blocks != expected.num_blocks or m.per_array != expected.per_array:
        raise ReplyRejected(
            f"{m.num_blocks} blocks ({m.per_array} per array) announced, the layout needs "
            f"{expected.num_blocks} ({expected.per_array} per array)"
        )
    if expected.base_sha256 and m.base_sha256 != expected.base_sha256:
        raise ReplyRejected(
            f"trained from model {short(m.base_sha256) or '(unknown)'}…, but this round's model is "
            f"{short(expected.base_sha256)}…"
        )
    return m


def _load_reply(
    arrays: ArrayRecord | None, meta: Mapping[str, Any] | None, expected: ExpectedReply
) -> tuple[list, bytes]:
    """Validate a reply completely; its ciphertexts (under the PUBLIC context) and first block.

    Raises :class:`ReplyRejected` with the reason to audit; the first block's bytes let
    :class:`EncryptedSum` refuse a replayed update.
    """
    import tenseal as ts

    check_meta(meta, expected)
    if arrays is None:
        raise ReplyRejected("no ciphertext blocks in the reply")
    try:
        blocks = record_blocks(arrays, expected.num_blocks, expected.per_array)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    lengths = expected.block_lengths
    scale = float(2**expected.scale_bits)
    vectors = []
    for i, (data, length) in enumerate(zip(blocks, lengths, strict=True)):
        if abs(len(data) - expected.block_bytes) > BLOCK_BYTES_TOLERANCE:
            raise ReplyRejected(
                f"block {i} has {len(data)} bytes; ciphertexts of these parameters have "
                f"{expected.block_bytes}"
            )
        try:
            vec = ts.ckks_vector_from(expected.ctx, data)
            cts = vec.ciphertext()
            ct = cts[0]
            shape_ok = (
                vec.size() == length
                and len(cts) == 1
                and ct.size() == 2
                and ct.poly_modulus_degree() == expected.params.poly_modulus_degree
                and ct.coeff_modulus_size() == expected.params.data_primes
                and ct.is_ntt_form()
                and not ct.is_transparent()  # an "encryption" that encrypts nothing
                and ct.scale == scale
            )
        except Exception as exc:  # TenSEAL/SEAL raise ValueError or RuntimeError on bad bytes
            raise ReplyRejected(
                f"block {i} does not deserialize under the public context: {exc}"
            ) from None
        if not shape_ok:
            raise ReplyRejected(
                f"block {i} is not a fresh {length}-slot ciphertext at scale "
                f"2^{expected.scale_bits} under the federation's parameters"
            )
        vectors.append(vec)
    return vectors, blocks[0]


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
        vectors, first = _load_reply(arrays, meta, self.expected)
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
            slots=e.params.slots,
            packing=e.packing,
            scale_bits=e.scale_bits,
            base_sha256=e.base_sha256 or "",
            summed=self.count,
        )
        blocks = [v.serialize() for v in self._acc]
        return blocks_to_record(blocks, e.per_array), meta.to_record()


# --- site side: decode ------------------------------------------------------------------------
def decode_aggregate_full(
    arrays: ArrayRecord,
    meta: Mapping[str, Any] | None,
    secret_ctx,
    *,
    layout: Layout,
    packing: Packing | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> DecodedSum:
    """Decrypt an aggregate into the FedAvg mean Δ (with the integer sums, for audits/tests)."""
    try:
        m = WireMeta.from_record(meta)
    except ValueError as exc:
        raise AggregateError(f"aggregate metadata: {exc}") from None
    if m.kind != KIND_AGGREGATE:
        raise AggregateError(f"expected an aggregate, got kind {m.kind!r}")
    own = fingerprint(secret_ctx)
    if m.fingerprint != own:
        raise AggregateError(
            f"aggregate encrypted under keys {short(m.fingerprint)}…, this site holds {short(own)}…"
        )
    if m.layout_hash != layout.hash or m.num_values != layout.num_values:
        raise AggregateError(
            f"aggregate layout {short(m.layout_hash)}… does not match this site's model "
            f"{short(layout.hash)}…"
        )
    if packing is not None and m.packing != packing:
        raise AggregateError(f"aggregate packing {m.packing} is not the experiment's {packing}")
    params = params_of(secret_ctx)
    if (
        m.scale_bits != m.packing.scale_bits(params)
        or m.num_blocks != m.packing.num_blocks(m.num_values, params)
        or m.per_array != blocks_per_array(params)
    ):
        raise AggregateError("aggregate scale or block count does not match its packing")
    try:
        blocks = record_blocks(arrays, m.num_blocks, m.per_array)
    except ValueError as exc:
        raise AggregateError(f"aggregate blocks: {exc}") from None
    try:
        return decode_blocks(
            blocks,
            secret_ctx,
            m.packing,
            layout,
            expected_contributors=m.summed,
            workers=workers,
            parallel_min_blocks=parallel_min_blocks,
        )
    except AggregateError:
        raise
    except Exception as exc:  # bytes that do not even deserialize
        raise AggregateError(f"aggregate does not decrypt: {exc}") from None


def decode_aggregate(
    arrays: ArrayRecord, meta: Mapping[str, Any] | None, secret_ctx, **kwargs: Any
) -> tuple[dict[str, np.ndarray], int, int]:
    """(mean Δ per tensor in float64, total example count, contributors) of an aggregate."""
    d = decode_aggregate_full(arrays, meta, secret_ctx, **kwargs)
    return d.mean, d.total_count, d.contributors


# --- storage of an encrypted model version (format "ckks") -------------------------------------
MAGIC = b"FEDCL-CKKS\x00\x01"


def aggregate_to_bytes(arrays: ArrayRecord, meta: Mapping[str, Any]) -> bytes:
    """One file for a model version: magic, JSON header (metadata, block sizes), blocks."""
    m = WireMeta.from_record(meta)
    blocks = record_blocks(arrays, m.num_blocks, m.per_array)
    header = json.dumps({"meta": m.to_dict(), "blocks": [len(b) for b in blocks]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blocks])


def aggregate_from_bytes(payload: bytes) -> tuple[ArrayRecord, ConfigRecord]:
    if not payload.startswith(MAGIC):
        raise ValueError("not a fedcl CKKS model version (bad magic)")
    pos = len(MAGIC)
    (size,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    header = json.loads(payload[pos : pos + size])
    pos += size
    blocks = []
    for n in header["blocks"]:
        blocks.append(payload[pos : pos + n])
        pos += n
    if pos != len(payload):
        raise ValueError("truncated or padded CKKS model version")
    meta = WireMeta.from_record(header["meta"])
    return blocks_to_record(blocks, meta.per_array), meta.to_record()
