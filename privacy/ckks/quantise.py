"""Stochastic quantisation of w·Δ, and packing unsigned fields into slot integers.

* :func:`quantise`: y = w·Δ / step (Δ clipped to [-clip, clip] first), rounded stochastically,
  floor(y + u) with u ~ U[0, 1): unbiased, E[q] = y, and |q - y| < 1; offset by
  ``Packing.offset`` to be unsigned, so q ∈ [0, 2^bits - 2].
* :func:`pack` / :func:`unpack`: ``values_per_slot`` fields of ``field_bits`` bits per slot,
  q0 + q1·2^F + q2·2^2F, and where the packing has one, a spill field above them that carries
  values cut into ``spill_bits``-bit chunks; the headroom keeps every field (and chunk) of a sum
  of ``max_sites`` slots below its width.
"""

from __future__ import annotations

import numpy as np

from .errors import UpdateError
from .packing import Packing


def quantise(
    flat: np.ndarray, weight: float, packing: Packing, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Clip, weight and stochastically round: unsigned integers in [0, 2^bits - 2], and the
    number of values that were clipped."""
    if not 0.0 < weight <= 1.0:
        raise UpdateError(f"weight {weight} outside (0, 1]")
    clipped = int(np.count_nonzero(np.abs(flat) > packing.clip))
    y = np.clip(flat, -packing.clip, packing.clip)
    y *= weight / packing.step
    y += rng.random(y.shape[0])
    q = np.floor(y).astype(np.int64)
    # |w·Δ/step| <= offset guarantees the range; the clip only guards float rounding at the edge.
    np.clip(q, -packing.offset, packing.offset, out=q)
    q += packing.offset
    return q, clipped


def pack(fields: np.ndarray, packing: Packing, payload_slots: int | None = None) -> np.ndarray:
    """Fields into slot integers (int64): q0 + q1·2^F + q2·2^2F, then the spill field above.

    Field k goes to full field k while k < ``values_per_slot`` × slots, the rest to the spill:
    spill value v is cut into ``chunks_per_value`` chunks of ``spill_bits`` bits (low first), in
    the spill fields of slots v·c .. v·c + c - 1. Unused positions are zero (the padding the
    decoder checks). ``payload_slots`` defaults to the fewest that hold every field.
    """
    m, f = packing.values_per_slot, packing.field_bits
    n = fields.shape[0]
    s = packing.payload_slots(n) if payload_slots is None else payload_slots
    if packing.capacity(s) < n:
        raise ValueError(f"{n} fields do not fit {s} slots of packing {packing}")
    main = np.zeros(m * s, dtype=np.int64)
    head = min(n, m * s)
    main[:head] = fields[:head]
    cols = main.reshape(s, m)
    slots = cols[:, 0].copy()
    for j in range(1, m):
        slots |= cols[:, j] << (f * j)
    rest = fields[head:]
    if rest.shape[0]:
        c, b = packing.chunks_per_value, packing.spill_bits
        shifts = np.arange(c, dtype=np.int64) * b
        chunks = ((rest[:, None] >> shifts) & ((1 << b) - 1)).reshape(-1)
        slots[: chunks.shape[0]] |= chunks << (f * m)
    return slots


def unpack(slots: np.ndarray, packing: Packing, num_values: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack` for summed slots (every field < 2^F by the headroom).

    Returns the full fields, then the spill values put back together from their chunk sums,
    then the chunks of a last incomplete spill value (padding, zero in an honest sum): the
    field order of :func:`pack`. ``num_values`` keeps only the first that many.
    """
    m, f = packing.values_per_slot, packing.field_bits
    mask = (1 << f) - 1
    out = np.empty((slots.shape[0], m), dtype=np.int64)
    for j in range(m):
        out[:, j] = (slots >> (f * j)) & mask
    fields = out.reshape(-1)
    if packing.spill_bits:
        c, b = packing.chunks_per_value, packing.spill_bits
        chunks = (slots >> (f * m)) & ((1 << packing.spill_field_bits) - 1)
        whole = (chunks.shape[0] // c) * c
        shifts = np.arange(c, dtype=np.int64) * b
        values = (chunks[:whole].reshape(-1, c) << shifts).sum(axis=1)
        fields = np.concatenate([fields, values, chunks[whole:]])
    return fields if num_values is None else fields[:num_values]
