"""Seeded symmetric encryption at the sites: half the bytes up and a third of the encrypt time.

Why: every site holds the federation's secret key (``secret.ctx``), so it may encrypt with it
instead of the public key. SEAL's symmetric encryption c = (-a·s + m + e, a) draws ``a`` from a
PRNG seed, and its *seeded* serialization sends c0 and the seed instead of ``a``: a fresh block
is 33 kB instead of 66 kB (N = 4096, one 60-bit prime), and encrypting takes ~0.26 ms instead
of ~0.73 (no ``u·pk`` products, one error term). Security is SEAL's RLWE at the same parameters
(128-bit, ``tc128``, checked when the SEAL context is built); the noise is a single fresh error,
smaller than a public-key encryption's, so the scale the public-key noise model picks
(:func:`~.params.min_scale_bits`) is conservative for it.

The coordinator is unchanged and key-less: TenSEAL's ``ckks_vector_from`` under the *public*
context expands the seed while loading (:mod:`.validate` accepts either size), and every sum,
so every aggregate, is a full-size ciphertext: bytes down are as before.

How: TenSEAL 0.3.18 cannot encrypt symmetrically with an asymmetric context, nor serialize a
seeded ciphertext. This module builds a ``tenseal.sealapi`` (SEAL) context with the exact
primes of the site's TenSEAL context, loads the secret key into it (through an anonymous
in-memory file, :class:`_Scratch`: SEAL's Python API saves and loads only through paths),
encrypts with ``Encryptor.encrypt_symmetric`` and wraps the seeded SEAL ciphertext in TenSEAL's
``CKKSVectorProto`` (size, ciphertext, scale), which TenSEAL then reads like its own.

Every block carries two integers per CKKS slot (:mod:`.complex_slots`, wire format 4), which
TenSEAL cannot encode or decode, so every encryption goes through SEAL here, seeded or (with
``FEDCL_CKKS_SEEDED=0``, or a public context) with the public key, and sites decrypt
aggregates here too (:class:`SealDecryptor`). If the bridge cannot be built (a TenSEAL build
without ``sealapi``), :func:`encryptor_for` returns ``None`` and encrypting fails with a
message saying so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import struct
import tempfile
import threading
import weakref

import numpy as np

from .complex_slots import from_complex, to_complex

logger = logging.getLogger("fedcl.privacy.ckks")

#: ``FEDCL_CKKS_SEEDED=0`` makes sites encrypt with the public key (full-size blocks).
ENV_SEEDED = "FEDCL_CKKS_SEEDED"

_ENCRYPTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECRYPTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _varint(x: int) -> bytes:
    out = bytearray()
    while True:
        byte, x = x & 0x7F, x >> 7
        if x:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wrap_ckks_vector(ciphertext: bytes, size: int, scale: float) -> bytes:
    """TenSEAL's ``CKKSVectorProto``: 1 = packed sizes, 2 = SEAL ciphertext, 3 = scale."""
    sizes = _varint(size)
    return b"".join(
        [
            b"\x0a",
            _varint(len(sizes)),
            sizes,
            b"\x12",
            _varint(len(ciphertext)),
            ciphertext,
            b"\x19",
            struct.pack("<d", scale),
        ]
    )


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint in a CKKSVectorProto")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def unwrap_ckks_vector(data: bytes) -> tuple[bytes, int, float]:
    """(SEAL ciphertext, size, scale) of a TenSEAL ``CKKSVectorProto`` holding one ciphertext:
    the inverse of :func:`wrap_ckks_vector`, for blocks TenSEAL serialized (aggregates).
    ``ValueError`` for anything else."""
    view = memoryview(data)
    pos, sizes, cipher, scale = 0, None, None, None
    while pos < len(view):
        tag, pos = _read_varint(view, pos)
        if tag in (0x0A, 0x12):
            n, pos = _read_varint(view, pos)
            if pos + n > len(view):
                raise ValueError("a CKKSVectorProto field runs past the end of the block")
            if tag == 0x0A:
                if sizes is not None:
                    raise ValueError("a CKKSVectorProto with two size fields")
                sizes = bytes(view[pos : pos + n])
            else:
                if cipher is not None:
                    raise ValueError("a block holds more than one ciphertext")
                cipher = bytes(view[pos : pos + n])
            pos += n
        elif tag == 0x19:
            if pos + 8 > len(view):
                raise ValueError("a CKKSVectorProto's scale is truncated")
            (scale,) = struct.unpack_from("<d", view, pos)
            pos += 8
        else:
            raise ValueError(f"unexpected field (tag {tag}) in a CKKSVectorProto")
    if sizes is None or cipher is None or scale is None:
        raise ValueError("a CKKSVectorProto without its size, ciphertext or scale")
    size, end = _read_varint(memoryview(sizes), 0)
    if end != len(sizes):
        raise ValueError("a CKKSVectorProto with more than one size")
    return cipher, size, scale


def _private_dir() -> str:
    """A fresh 0700 directory, in memory where the system has one (/dev/shm)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="fedcl-ckks-", dir=base)


class _Scratch:
    """A path SEAL's ``save``/``load`` can use, and what was saved there read back.

    Where Linux offers it, an anonymous in-memory file (``memfd_create``) reached as
    ``/proc/self/fd/N``: it has no name in any file system, only this process (and root) can
    open it, and it is gone when closed. Otherwise a fresh 0700 directory (in /dev/shm where
    there is one) holding one file. Either is made once and reused for every block (making and
    removing a directory per message cost more than saving a block); :meth:`close` truncates
    and removes it.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._dir: str | None = None
        memfd = getattr(os, "memfd_create", None)
        self.pid = os.getpid()
        if memfd is not None and os.path.isdir("/proc/self/fd"):
            try:
                self._fd = memfd("fedcl-ckks", getattr(os, "MFD_CLOEXEC", 0))
                self.path = f"/proc/self/fd/{self._fd}"
                return
            except OSError:
                self._fd = None
        self._dir = _private_dir()
        self.path = os.path.join(self._dir, "x")

    def read(self) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        with open(self.path, "rb") as fh:
            return fh.read()

    def write(self, data: bytes) -> None:
        """Replace what the scratch holds with ``data`` (for SEAL's ``load``)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            return
        with open(self.path, "wb") as fh:
            fh.write(data)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # what was written (a secret key) is freed now
                os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parameters(ctx) -> tuple[int, tuple[int, ...]]:
    """(N, the coefficient modulus primes) of a TenSEAL context."""
    import tenseal.sealapi  # noqa: F401 - registers seal::Modulus so coeff_modulus() converts

    parms = ctx.seal_context().data.key_context_data().parms()
    return int(parms.poly_modulus_degree()), tuple(int(m.value()) for m in parms.coeff_modulus())


def _seal_context(ctx, sa):
    """A SEAL context with exactly the TenSEAL context's parameters (tc128 enforced)."""
    return _seal_context_of(*_parameters(ctx), sa)


def _seal_context_of(n: int, primes: tuple[int, ...], sa):
    mine = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    mine.set_poly_modulus_degree(n)
    mine.set_coeff_modulus([sa.Modulus(p) for p in primes])
    seal = sa.SEALContext(mine, True, sa.SEC_LEVEL_TYPE.TC128)
    if not seal.parameters_set():
        raise RuntimeError(f"SEAL refuses the parameters: {seal.parameter_error_message()}")
    return seal


def _load_key(key, cls, seal):
    """A TenSEAL key object copied into a ``sealapi`` one (the two modules do not share types);
    the copy passes through an anonymous scratch file that is freed when this returns."""
    with _Scratch() as key_file:
        key.save(key_file.path)
        out = cls()
        out.load(seal, key_file.path)
    return out


class SeededEncryptor:
    """CKKS encryption of rows of slot integers, two per CKKS slot (:mod:`.complex_slots`).

    Symmetric and seeded under a site's secret context (see the module doc); with the public
    key where ``seeded`` is false or the context is public (full-size blocks).
    """

    def __init__(self, ctx, *, seeded: bool = True) -> None:
        import tenseal.sealapi as sa

        self._sa = sa
        self.seal = _seal_context(ctx, sa)
        self.seeded = bool(seeded and ctx.is_private())
        if self.seeded:  # the secret key's copy is freed when its scratch file closes
            self.encryptor = sa.Encryptor(
                self.seal, _load_key(ctx.data.secret_key(), sa.SecretKey, self.seal)
            )
        else:
            self.encryptor = sa.Encryptor(
                self.seal, _load_key(ctx.data.public_key(), sa.PublicKey, self.seal)
            )
        self.encoder = sa.CKKSEncoder(self.seal)
        self.slots = self.encoder.slot_count()
        # Ciphertexts (not secret: they are sent) pass through one scratch file per encryptor,
        # made once; one encryption at a time uses it.
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        self._plain = sa.Plaintext()
        self._cipher = sa.Ciphertext()
        weakref.finalize(self, self._scratch.close)

    @property
    def row_values(self) -> int:
        """Slot integers one ciphertext holds: two per CKKS slot."""
        return 2 * self.slots

    def encrypt(self, rows: list[np.ndarray], scale: float) -> list[bytes]:
        """One ciphertext per row (each at most 2·N/2 integers), as TenSEAL CKKSVector bytes
        whose size is the CKKS slots used, ceil(len(row) / 2)."""
        out = []
        for row in rows:
            if row.shape[0] > self.row_values:
                raise ValueError(f"a row of {row.shape[0]} values exceeds {self.row_values}")
        with self._lock:
            if self._scratch.pid != os.getpid():  # a forked child: never share the parent's
                self._scratch = _Scratch()
                weakref.finalize(self, self._scratch.close)
            plain, path = self._plain, self._scratch.path
            for row in rows:
                values = to_complex(row)
                self.encoder.encode(values.tolist(), scale, plain)
                if self.seeded:
                    self.encryptor.encrypt_symmetric(plain).save(path)
                else:
                    self.encryptor.encrypt(plain, self._cipher)
                    self._cipher.save(path)
                out.append(wrap_ckks_vector(self._scratch.read(), values.shape[0], scale))
        return out


class SealDecryptor:
    """Decrypts blocks (TenSEAL CKKSVector bytes) under a secret context, two integers per
    CKKS slot: what TenSEAL's ``decrypt`` cannot do, as it returns the real parts only."""

    def __init__(self, ctx) -> None:
        import tenseal.sealapi as sa

        if not ctx.is_private():
            raise ValueError("decrypting needs the secret context")
        self.seal = _seal_context(ctx, sa)
        self.decryptor = sa.Decryptor(
            self.seal, _load_key(ctx.data.secret_key(), sa.SecretKey, self.seal)
        )
        self.encoder = sa.CKKSEncoder(self.seal)
        self.slots = self.encoder.slot_count()
        self._sa = sa
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        weakref.finalize(self, self._scratch.close)

    def decrypt(self, blocks: list[bytes]) -> list[np.ndarray]:
        """Each block's slot integers (float64, 2·size of them), in order; ``ValueError`` for a
        block that is not one ciphertext of these parameters."""
        sa, out = self._sa, []
        with self._lock:
            if self._scratch.pid != os.getpid():
                self._scratch = _Scratch()
                weakref.finalize(self, self._scratch.close)
            for data in blocks:
                cipher, size, _scale = unwrap_ckks_vector(data)
                if not 1 <= size <= self.slots:
                    raise ValueError(f"a block of {size} slots; ciphertexts hold 1..{self.slots}")
                self._scratch.write(cipher)
                ct, plain = sa.Ciphertext(), sa.Plaintext()
                ct.load(self.seal, self._scratch.path)  # SEAL checks it fits the parameters
                self.decryptor.decrypt(ct, plain)
                values = np.asarray(self.encoder.decode_complex(plain)[:size])
                out.append(from_complex(values))
        return out


def enabled() -> bool:
    return os.environ.get(ENV_SEEDED, "1").strip() not in ("0", "false", "no")


def encryptor_for(ctx) -> SeededEncryptor | None:
    """The SEAL encryptor of a context (built once per context and process): seeded under a
    secret context, public-key under a public one or with ``FEDCL_CKKS_SEEDED=0``; ``None``
    where this TenSEAL cannot be bridged to SEAL."""
    seeded = enabled()
    try:
        enc = _ENCRYPTORS[ctx]
        if enc is None or enc.seeded == (seeded and ctx.is_private()):
            return enc
    except (KeyError, TypeError):
        pass
    try:
        enc = SeededEncryptor(ctx, seeded=seeded)
    except Exception as exc:  # another TenSEAL/SEAL build
        logger.warning("SEAL encryption unavailable (%s)", exc)
        enc = None
    with contextlib.suppress(TypeError):
        _ENCRYPTORS[ctx] = enc
    return enc


def decryptor_for(ctx) -> SealDecryptor:
    """The SEAL decryptor of a secret context (built once per context and process)."""
    try:
        return _DECRYPTORS[ctx]
    except (KeyError, TypeError):
        pass
    dec = SealDecryptor(ctx)
    with contextlib.suppress(TypeError):
        _DECRYPTORS[ctx] = dec
    return dec


def seeded_block_bytes(public_ctx, scale: float) -> int:
    """Bytes of a one-slot seeded block under ``public_ctx``'s parameters, for the coordinator's
    size check (computed once per parameters and scale)."""
    return _seeded_block_bytes(*_parameters(public_ctx), float(scale))


@functools.cache
def _seeded_block_bytes(n: int, primes: tuple[int, ...], scale: float) -> int:
    """Encrypted under a throwaway secret key made here and discarded (the coordinator never
    holds the federation's); the size depends only on the parameters."""
    import tenseal.sealapi as sa

    seal = _seal_context_of(n, primes, sa)
    throwaway = sa.KeyGenerator(seal).secret_key()
    encoder, encryptor = sa.CKKSEncoder(seal), sa.Encryptor(seal, throwaway)
    plain = sa.Plaintext()
    encoder.encode([0.0], scale, plain)
    with _Scratch() as scratch:
        encryptor.encrypt_symmetric(plain).save(scratch.path)
        return len(wrap_ckks_vector(scratch.read(), 1, scale))
