"""Two slot integers per CKKS slot: the real and the imaginary part (wire format 4).

Why: a CKKS plaintext of degree N has N/2 *complex* slots. TenSEAL's ``CKKSVector`` encodes
only real parts, so a block carried N/2 integers and its imaginary halves encrypted zeros.
Encoding ``row[0::2] + i·row[1::2]`` puts N integers in the same ciphertext: the default
scenario's update needs 2 blocks instead of 4, so each site encrypts, the coordinator loads and
adds, and each process decrypts half as many ciphertexts, and sends half the bytes.

Exactness is unchanged: the decoding error of a fresh (or summed) ciphertext is a complex
number whose real and imaginary parts have the same spread (the canonical embedding of the
noise polynomial), so the scale that keeps the real parts exact (:func:`~.params.min_scale_bits`)
keeps the imaginary parts exact too (measured in tests/test_ckks_complex_slots.py). The
coordinator never decodes, so it is unaffected: it adds ciphertexts as before.

Nothing here touches SEAL: :mod:`.seeded` encodes and decodes through ``tenseal.sealapi`` with
these two functions, the only place the interleaving is written.
"""

from __future__ import annotations

import numpy as np


def complex_size(length: int) -> int:
    """CKKS slots a row of ``length`` integers occupies (two per slot, the last maybe half)."""
    return -(-int(length) // 2)


def to_complex(row: np.ndarray) -> np.ndarray:
    """``row[0::2] + 1j·row[1::2]`` (complex128); an odd last value gets imaginary part 0."""
    row = np.asarray(row, dtype=np.float64)
    out = np.zeros(complex_size(row.shape[0]), dtype=np.complex128)
    out.real = row[0::2]
    out.imag[: row.shape[0] // 2] = row[1::2]
    return out


def from_complex(values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_complex`: the interleaved real and imaginary parts (float64, twice
    as long; an odd row's padding comes back as its last value)."""
    values = np.asarray(values, dtype=np.complex128)
    out = np.empty(2 * values.shape[0], dtype=np.float64)
    out[0::2] = values.real
    out[1::2] = values.imag
    return out
