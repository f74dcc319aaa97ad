"""Stochastic quantisation of w·Δ, and packing unsigned fields into slot integers.

* :func:`quantise`: y = w·Δ / step (Δ clipped to [-clip, clip] first), rounded stochastically,
  floor(y + u) with u ~ U[0, 1): unbiased, E[q] = y, and |q - y| < 1; offset by
  ``Packing.offset`` to be unsigned, so q ∈ [0, 2^bits - 2].
* :func:`pack` / :func:`unpack`: ``values_per_slot`` fields of ``field_bits`` bits per slot,
  q0 + q1·2^F + q2·2^2F; the headroom keeps every field of a sum of ``max_sites`` slots below 2^F.
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


def pack(q: np.ndarray, packing: Packing) -> np.ndarray:
    """``values_per_slot`` unsigned fields per slot: q0 + q1·2^F + q2·2^2F (int64)."""
    m = packing.values_per_slot
    pad = (-q.shape[0]) % m
    if pad:
        q = np.concatenate([q, np.zeros(pad, dtype=np.int64)])
    cols = q.reshape(-1, m)
    slots = cols[:, 0].copy()
    for j in range(1, m):
        slots |= cols[:, j] << (packing.field_bits * j)
    return slots


def unpack(slots: np.ndarray, packing: Packing, num_values: int) -> np.ndarray:
    """Inverse of :func:`pack` for summed slots (every field < 2^F by the headroom)."""
    m, f = packing.values_per_slot, packing.field_bits
    mask = (1 << f) - 1
    out = np.empty((slots.shape[0], m), dtype=np.int64)
    for j in range(m):
        out[:, j] = (slots >> (f * j)) & mask
    return out.reshape(-1)[:num_values]
