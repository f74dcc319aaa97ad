"""Encrypted wire format (docs/DESIGN.md §5): blocks in an ArrayRecord, metadata in a ConfigRecord.

A site's reply (and the coordinator's aggregate) carries ``content["arrays"]``, an
``ArrayRecord`` of raw-bytes Arrays, each holding several length-framed ciphertexts
(:mod:`.framing`), and ``content["ckks"]``, a ``ConfigRecord`` with the format version, the
context fingerprint, the layout hash, the packing and the block count (:mod:`.meta`). It never
carries an example count: those are only in ciphertext.

The coordinator validates every reply against an :class:`ExpectedReply` built from the *public*
context (:mod:`.validate`), and adds ciphertexts block-wise with :class:`EncryptedSum`
(:mod:`.sum`). A site decodes an aggregate with :func:`decode_aggregate`, which checks that the
decrypted contributor count equals the metadata's, so a tampered or corrupt aggregate is refused
rather than applied. An aggregate is stored as one file by :mod:`.storage`.

This module is the face callers import from: every name of the modules above is re-exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from .codec import DecodedSum, EncodeStats, Layout, Packing, decode_blocks, encode_blocks
from .errors import AggregateError
from .framing import (
    ARRAY_TARGET_BYTES,
    BLOCK_PREFIX,
    BLOCK_STYPE,
    FRAME,
    block_key,
    blocks_per_array,
    blocks_to_record,
    record_blocks,
)
from .keys import fingerprint, short
from .meta import (
    BASE,
    BITS,
    BLOCKS,
    CLIP,
    FINGERPRINT,
    FORMAT,
    FORMAT_VERSION,
    KIND,
    KIND_AGGREGATE,
    KIND_UPDATE,
    LAYOUT,
    MAX_EXAMPLES,
    MAX_SITES,
    META_KEY,
    PER_ARRAY,
    SCALE_BITS,
    SLOTS,
    SPILL_BITS,
    SUMMED,
    VALUES,
    VALUES_PER_SLOT,
    WireMeta,
)
from .params import params_of
from .storage import MAGIC, aggregate_from_bytes, aggregate_to_bytes
from .sum import EncryptedSum
from .validate import BLOCK_BYTES_TOLERANCE, ExpectedReply, check_meta

__all__ = [
    "ARRAY_TARGET_BYTES",
    "BASE",
    "BITS",
    "BLOCKS",
    "BLOCK_BYTES_TOLERANCE",
    "BLOCK_PREFIX",
    "BLOCK_STYPE",
    "CLIP",
    "FINGERPRINT",
    "FORMAT",
    "FORMAT_VERSION",
    "FRAME",
    "KIND",
    "KIND_AGGREGATE",
    "KIND_UPDATE",
    "LAYOUT",
    "MAGIC",
    "MAX_EXAMPLES",
    "MAX_SITES",
    "META_KEY",
    "PER_ARRAY",
    "SCALE_BITS",
    "SLOTS",
    "SPILL_BITS",
    "SUMMED",
    "VALUES",
    "VALUES_PER_SLOT",
    "EncryptedSum",
    "EncryptedUpdate",
    "ExpectedReply",
    "WireMeta",
    "aggregate_from_bytes",
    "aggregate_to_bytes",
    "block_key",
    "blocks_per_array",
    "blocks_to_record",
    "check_meta",
    "decode_aggregate",
    "decode_aggregate_full",
    "encrypt_update",
    "record_blocks",
]


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
        slots=params.block_values,
        packing=packing,
        scale_bits=enc.scale_bits,
        base_sha256=base_sha256,
    )
    arrays = blocks_to_record(enc.blocks, meta.per_array)
    return EncryptedUpdate(arrays, meta.to_record(), enc.stats)


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
    # Format 4 holds two slot integers per CKKS slot (N per block); 2 and 3 held N/2.
    if m.slots not in (params.block_values, params.slots):
        raise AggregateError(
            f"aggregate blocks of {m.slots} slot integers; these parameters hold "
            f"{params.block_values}"
        )
    complex_slots = m.slots == params.block_values
    if (
        m.scale_bits != m.packing.scale_bits(params)
        or m.num_blocks != m.packing.num_blocks(m.num_values, params, m.slots)
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
            complex_slots=complex_slots,
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
