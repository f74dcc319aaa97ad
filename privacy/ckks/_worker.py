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
    """One ciphertext per row of slot integers (two per CKKS slot, :mod:`.complex_slots`).

    Seeded symmetric encryption under a secret context (:mod:`.seeded`: half the bytes, a third
    of the time), public-key encryption under a public one or with ``FEDCL_CKKS_SEEDED=0``.
    """
    from .seeded import encryptor_for  # numpy and the standard library only

    enc = encryptor_for(ctx)
    if enc is None:
        raise RuntimeError(
            "this TenSEAL build has no working tenseal.sealapi, which fedcl needs to encode two "
            "values per CKKS slot (wire format 4): install the TenSEAL wheel fedcl pins"
        )
    return enc.encrypt(rows, scale)


def decrypt_with(ctx, blocks: list[bytes], complex_slots: bool = True) -> list[np.ndarray]:
    """Each block's slot integers: two per CKKS slot (format 4), or the real parts only (an
    aggregate stored by format 2 or 3)."""
    if complex_slots:
        from .seeded import decryptor_for

        return decryptor_for(ctx).decrypt(blocks)
    import tenseal as ts

    return [np.asarray(ts.ckks_vector_from(ctx, b).decrypt(), dtype=np.float64) for b in blocks]


def encrypt(rows: list[np.ndarray], scale: float) -> list[bytes]:
    return encrypt_with(_CTX, rows, scale)


def decrypt(blocks: list[bytes], complex_slots: bool = True) -> list[np.ndarray]:
    return decrypt_with(_CTX, blocks, complex_slots)
