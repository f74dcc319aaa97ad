"""The code that runs inside CKKS worker processes (and in-process for small updates).

Kept free of fedcl imports beyond numpy, TenSEAL and :mod:`.seeded` (standard library) so a
spawned worker starts in ~1 s: it holds one deserialized context, received once through the pool
initializer (and its seeded encryptor, built at the first block).
"""

from __future__ import annotations

import numpy as np

_CTX = None


def init(context_bytes: bytes) -> None:
    """Pool initializer: deserialize the context once per worker (single-threaded SEAL)."""
    global _CTX
    import tenseal as ts

    _CTX = ts.context_from(context_bytes, n_threads=1)


def encrypt_with(ctx, rows: list[np.ndarray], scale: float) -> list[bytes]:
    """One ciphertext per row (each at most N/2 slots: longer vectors make TenSEAL warn).

    Seeded symmetric encryption under a secret context (:mod:`.seeded`: half the bytes, a third
    of the time), public-key encryption where that is not available.
    """
    import tenseal as ts

    from .seeded import encryptor_for  # numpy and the standard library only

    seeded = encryptor_for(ctx)
    if seeded is not None:
        return seeded.encrypt(rows, scale)
    return [ts.ckks_vector(ctx, row.tolist(), scale=scale).serialize() for row in rows]


def decrypt_with(ctx, blocks: list[bytes]) -> list[np.ndarray]:
    import tenseal as ts

    return [np.asarray(ts.ckks_vector_from(ctx, b).decrypt(), dtype=np.float64) for b in blocks]


def encrypt(rows: list[np.ndarray], scale: float) -> list[bytes]:
    return encrypt_with(_CTX, rows, scale)


def decrypt(blocks: list[bytes]) -> list[np.ndarray]:
    return decrypt_with(_CTX, blocks)
