"""From a site's model update to CKKS blocks and back: layout, quantisation, packing, checksum.

What a site encrypts (and why)
------------------------------
FedAvg needs Σ n_i·Δ_i / Σ n_i. The coordinator may only add, and must not learn n_i, so each
site sends, inside the ciphertext, both its weighted update and its weight:

* **Layout**: the state dict is flattened in a fixed order (:class:`Layout`: names, shapes,
  dtypes). Its SHA-256 travels with every message so a site with another model is rejected
  instead of being added into the wrong coordinates.
* **Weight**: w_i = min(n_i, max_examples) / max_examples, in [0, 1]. Sites cannot know each
  other's counts, so a common unit is a setting; a site with more than ``max_examples`` examples
  is weighted as ``max_examples`` (logged at the site). Sites far smaller than the unit keep
  less of their own precision, but the error of the *average* stays within
  :meth:`Packing.error_bound`.
* **Clipping**: Δ is clipped to [-clip, clip] *before* weighting; values outside are clipped and
  counted (:attr:`EncodeStats.clipped`; the site decides whether to report the fraction), not
  refused, because one outlier weight must not cost a site its round. NaN or inf is refused
  (:class:`UpdateError` naming the tensor) before anything is encrypted.
* **Quantisation**: y = w·Δ / step with step = clip / (2^(bits-1) - 1), rounded
  *stochastically* (floor(y + u), u ~ U[0, 1)): unbiased, E[q] = y, and |q - y| < 1. The integer
  r ∈ [-(2^(bits-1)-1), 2^(bits-1)-1] is offset by ``offset`` = 2^(bits-1) - 1 to be unsigned,
  so q ∈ [0, 2^bits - 2].
* **Packing**: each field gets ``bits + headroom`` bits, headroom = ceil(log2(max_sites)), so the
  sum of up to ``max_sites`` fields never carries into its neighbour; ``values_per_slot``
  fields share one slot as q0 + q1·2^F + q2·2^2F; where the round leaves bits to spare above
  them, a narrower spill field carries further values cut into chunks
  (:attr:`Packing.spill_bits`, chosen by :func:`~.packing.spill_bits_for`). The first two
  slots of block 0 hold the contributor count (1) and the capped example count: after
  summation the sites learn both and the coordinator neither. Decoding subtracts offset ×
  contributors from every field.
* **Checksum**: after the values come ``Packing.checksum_fields`` keyed linear checksums of the
  header and values, each below 2^bits like a value, so they sum exactly too; a site decoding an
  aggregate checks them and refuses a corrupt one (:class:`AggregateIntegrityError`;
  :mod:`.integrity`).
* **Exactness**: slots are integers times the scale 2^s; :meth:`Packing.scale_bits` picks the
  largest s that fits the data prime and refuses (:class:`CKKSConfigError`) a packing whose s
  would let the noise of ``max_sites`` summed ciphertexts reach 0.5.

Encrypting is TenSEAL's cost and holds the GIL, so large updates are encrypted in worker
processes (:mod:`.parallel`); small ones stay in-process. The pieces live in :mod:`.layout`,
:mod:`.quantise`, :mod:`.packing` and :mod:`.integrity`; this module puts them together (and
re-exports their names).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import AggregateError, AggregateIntegrityError, UpdateError
from .integrity import UNKEYED, checksum_key, checksums, verify
from .layout import LAYOUT_VERSION, Layout, LayoutEntry
from .packing import HEADER_SLOTS, Packing, check_packing, packing_for
from .params import MAX_EXACT_FLOAT_BITS
from .quantise import pack, quantise, unpack

__all__ = [
    "HEADER_SLOTS",
    "LAYOUT_VERSION",
    "MAX_EXACT_FLOAT_BITS",
    "MAX_FRACTION",
    "DecodedSum",
    "EncodeStats",
    "EncodedBlocks",
    "Layout",
    "LayoutEntry",
    "Packing",
    "check_packing",
    "decode_blocks",
    "decode_slots",
    "encode_blocks",
    "pack",
    "packing_for",
    "quantise",
    "slot_vector",
    "unpack",
]

logger = logging.getLogger("fedcl.privacy.ckks")

#: Decrypted values further than this from an integer mean a wrong key, a corrupt block, or
#: noise beyond the model. Measured honest sums: max 0.10 (20 sites) and 0.14 (32 sites, the most
#: the default packing allows) over 123k slots; a garbage block has uniform fractions, so 2048
#: slots all below 0.4 by chance has probability 0.8^2048.
MAX_FRACTION = 0.4


@dataclass
class EncodeStats:
    """What a site learns about its own encoding (site-local; nothing here is sent by default)."""

    num_values: int
    num_blocks: int
    clipped: int
    weight_capped: bool
    seconds: float
    workers: int

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / max(1, self.num_values)

    def metrics(self) -> dict[str, float]:
        """Metrics a site may report: no counts of examples, only how much was clipped."""
        return {
            "ckks-clipped-fraction": self.clipped_fraction,
            "ckks-encrypt-seconds": self.seconds,
        }


@dataclass
class EncodedBlocks:
    blocks: list[bytes]
    scale_bits: int
    layout: Layout
    stats: EncodeStats


def slot_vector(
    delta: Mapping[str, Any],
    num_examples: int,
    packing: Packing,
    layout: Layout,
    rng: np.random.Generator,
    *,
    key: bytes = UNKEYED,
) -> tuple[np.ndarray, int, bool]:
    """The plaintext slots of one site's update: header, then its values and checksums packed.

    ``key`` keys the checksum (:func:`~.integrity.checksum_key`; :func:`encode_blocks` passes
    the site's); the decoder must be given the same.
    """
    if int(num_examples) != num_examples or num_examples < 1:
        raise UpdateError(f"an update needs a positive integer example count, got {num_examples}")
    flat = layout.flatten(delta)  # NaN/inf refused here, before anything is encrypted
    capped = num_examples > packing.max_examples
    count = min(int(num_examples), packing.max_examples)
    if capped:
        logger.warning(
            "site update: %d examples exceed he.max_examples = %d; weighted as %d",
            num_examples,
            packing.max_examples,
            packing.max_examples,
        )
    q, clipped = quantise(flat, count / packing.max_examples, packing, rng)
    del flat
    sums = checksums(q, (1, count), packing.checksum_moduli, key)
    slots = np.empty(packing.slots_needed(layout.num_values), dtype=np.float64)
    slots[0] = 1.0
    slots[1] = float(count)
    slots[HEADER_SLOTS:] = pack(np.concatenate([q, sums]), packing, slots.shape[0] - HEADER_SLOTS)
    return slots, clipped, capped


def encode_blocks(
    delta: Mapping[str, Any],
    num_examples: int,
    ctx,
    packing: Packing,
    *,
    layout: Layout | None = None,
    rng: np.random.Generator | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> EncodedBlocks:
    """Encrypt one site's update Δ (weighted by its example count) into serialized blocks.

    ``ctx`` is the site's secret context: the checksum inside is keyed by its secret key.
    """
    from .parallel import encrypt_rows
    from .params import params_of

    start = time.perf_counter()
    layout = layout or Layout.from_state_dict(delta)
    params = params_of(ctx)
    scale_bits = packing.scale_bits(params)
    key = checksum_key(ctx)
    slots, clipped, capped = slot_vector(
        delta, num_examples, packing, layout, rng or np.random.default_rng(), key=key
    )
    per = params.block_values  # two slot integers per CKKS slot (.complex_slots)
    rows = [slots[i : i + per] for i in range(0, slots.shape[0], per)]
    blocks, used = encrypt_rows(
        rows, ctx, float(2**scale_bits), workers=workers, min_blocks=parallel_min_blocks
    )
    stats = EncodeStats(
        num_values=layout.num_values,
        num_blocks=len(blocks),
        clipped=clipped,
        weight_capped=capped,
        seconds=time.perf_counter() - start,
        workers=used,
    )
    return EncodedBlocks(blocks, scale_bits, layout, stats)


@dataclass
class DecodedSum:
    """A decrypted aggregate: the FedAvg mean Δ and what the sites learn with it."""

    mean: dict[str, np.ndarray]
    total_count: int
    contributors: int
    field_sums: np.ndarray = field(repr=False)  # Σ of the sites' signed quantised integers


def decode_slots(
    values: np.ndarray,
    packing: Packing,
    layout: Layout,
    *,
    expected_contributors: int | None = None,
    key: bytes = UNKEYED,
) -> DecodedSum:
    """Turn decrypted slot values into the average Δ; every check names what went wrong.

    Corrupt contents (slots that are not integers, a checksum that does not match) raise
    :class:`AggregateIntegrityError`; an aggregate that is intact but not what this site
    expects (slot count, contributor count against the metadata) an :class:`AggregateError`.
    """
    rounded = np.rint(values)
    worst = float(np.max(np.abs(values - rounded))) if values.size else 0.0
    if not worst <= MAX_FRACTION:
        raise AggregateIntegrityError(
            f"the aggregate is corrupt: it does not decrypt to integers (off by up to "
            f"{worst:.3g}): a corrupt block from one of its sites, a wrong key, or more sites "
            "than the packing's noise budget"
        )
    if values.shape[0] != packing.slots_needed(layout.num_values):
        raise AggregateError(
            f"the aggregate has {values.shape[0]} slots, the layout needs "
            f"{packing.slots_needed(layout.num_values)}"
        )
    ints = rounded.astype(np.int64)
    contributors, total = int(ints[0]), int(ints[1])
    slots = ints[HEADER_SLOTS:]
    fields = unpack(slots, packing)
    verify(fields, layout.num_values, (contributors, total), packing, key)
    if expected_contributors is not None and contributors != expected_contributors:
        raise AggregateError(
            f"the aggregate says {contributors} sites contributed, its metadata says "
            f"{expected_contributors}: refusing a tampered or corrupt aggregate"
        )
    if not 1 <= contributors <= packing.max_sites:
        raise AggregateError(
            f"the aggregate sums {contributors} sites; the packing allows 1..{packing.max_sites}"
        )
    if not contributors <= total <= contributors * packing.max_examples:
        raise AggregateError(
            f"the aggregate's example count {total} is impossible for {contributors} sites"
        )
    if slots.size and (slots.min() < 0 or slots.max() >= 2**packing.slot_bits):
        raise AggregateError("the aggregate overflows its packing (more sites than he.max_sites?)")
    sums = fields[: layout.num_values] - packing.offset * contributors
    mean = sums.astype(np.float64) * (packing.step * packing.max_examples / total)
    return DecodedSum(layout.unflatten(mean), total, contributors, sums)


def decode_blocks(
    blocks: list[bytes],
    ctx,
    packing: Packing,
    layout: Layout,
    *,
    expected_contributors: int | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
    complex_slots: bool = True,
) -> DecodedSum:
    """Decrypt (with the site's secret context) and decode an aggregate, checksum checked.

    ``complex_slots`` (wire format 4): two slot integers per CKKS slot; an odd count leaves the
    last slot's imaginary part as padding, which must decrypt to 0 and is dropped. False: the
    real parts only (an aggregate stored by format 2 or 3).
    """
    from .parallel import decrypt_blocks

    key = checksum_key(ctx)
    rows, _ = decrypt_blocks(
        blocks, ctx, workers=workers, min_blocks=parallel_min_blocks, complex_slots=complex_slots
    )
    values = np.concatenate(rows) if rows else np.empty(0)
    need = packing.slots_needed(layout.num_values)
    if complex_slots and values.shape[0] == need + 1:
        if not abs(float(values[-1])) <= MAX_FRACTION:
            raise AggregateIntegrityError(
                f"the aggregate is corrupt: its padding slot decrypts to {float(values[-1]):.4g}, "
                "not 0"
            )
        values = values[:need]
    return decode_slots(
        values, packing, layout, expected_contributors=expected_contributors, key=key
    )
