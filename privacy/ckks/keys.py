"""CKKS key custody: one secret context for the sites, one public context for the coordinator.

TenSEAL has no threshold or multi-key CKKS, so every site holds the same secret key and the
coordinator holds only the public part (docs/DESIGN.md §4). What this module guarantees:

* ``init_keys`` writes ``secret.ctx`` (parameters, public key and secret key; file mode 0600,
  for the sites, handed over out of band) and ``public.ctx`` (parameters and public key only: no
  secret key, no Galois or relinearisation keys, since the coordinator only *adds*
  ciphertexts). It never overwrites existing key files unless asked to.
* The **fingerprint** is the SHA-256 (hex) of the public context bytes. A secret context is
  fingerprinted through its public part, so both files of one key set show the same
  fingerprint, every message carries it, and a site or coordinator with other keys is caught
  before anything is added or decrypted.
* ``load_public_context`` refuses a secret context: the coordinator must never hold the key,
  even by mistake of a file name. ``load_secret_context`` **refuses** (not warns) a file that
  group or others can read, like ``ssh`` does with private keys: a secret key that leaked on a
  shared host cannot be un-leaked, and ``chmod 600`` is a one-line fix.

Parameters (see :mod:`.params`): N = 4096 with primes [60, 49] = 109 bits, SEAL's 128-bit limit
for N = 4096; one 60-bit data level, enough for additions; 2048 slots per ciphertext.
The fingerprint depends on the serialized context, so never set ``global_scale`` or the
``auto_*`` flags on a loaded context: fedcl passes the scale explicitly to every encryption.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CKKSKeyError
from .params import CKKSParams, params_of

SECRET_FILE = "secret.ctx"
PUBLIC_FILE = "public.ctx"

KeyKind = Literal["secret", "public"]

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class KeyFiles:
    """What ``init_keys`` wrote."""

    secret: Path
    public: Path
    fingerprint: str
    params: CKKSParams


@dataclass(frozen=True)
class KeyFileInfo:
    """What ``fedcl keys show`` prints about one key file."""

    path: Path
    kind: KeyKind
    fingerprint: str
    params: CKKSParams
    mode: int

    @property
    def too_open(self) -> bool:
        """A secret file that group or others may read (what ``load_secret_context`` refuses)."""
        return self.kind == "secret" and _mode_too_open(self.mode)


def new_context(params: CKKSParams | None = None):
    """A fresh CKKS context with a new key pair (public-key encryption, no Galois/relin keys)."""
    import tenseal as ts

    params = params or CKKSParams()
    params.check()
    return ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
        n_threads=1,
    )


def public_bytes(ctx) -> bytes:
    """The public part of a context: parameters and public key, nothing else."""
    return ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def secret_bytes(ctx) -> bytes:
    """The whole site context: parameters, public key and secret key (no Galois/relin keys)."""
    if not ctx.is_private():
        raise CKKSKeyError("this context has no secret key: it cannot be saved as secret.ctx")
    return ctx.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def fingerprint_bytes(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()


def fingerprint(ctx) -> str:
    """SHA-256 of the context's public part: the same for a key set's secret and public file."""
    try:
        return _FINGERPRINTS[ctx]
    except (KeyError, TypeError):
        pass
    value = fingerprint_bytes(public_bytes(ctx))
    with contextlib.suppress(TypeError):  # not weakly referenceable: just do not cache
        _FINGERPRINTS[ctx] = value
    return value


def short(fp: str) -> str:
    """The first 16 hex digits, enough to tell key sets apart in a log line."""
    return fp[:16]


def init_keys(
    out_dir: Path | str, params: CKKSParams | None = None, *, force: bool = False
) -> KeyFiles:
    """Create a key set in ``out_dir``: ``secret.ctx`` (0600, sites) and ``public.ctx``.

    Refuses to overwrite either file unless ``force``: replacing keys mid-federation makes every
    site's next update undecryptable by the others.
    """
    params = params or CKKSParams()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out / SECRET_FILE, out / PUBLIC_FILE
    existing = [p for p in (secret_path, public_path) if p.exists()]
    if existing and not force:
        raise CKKSKeyError(
            f"{', '.join(str(p) for p in existing)} already exist: refusing to overwrite key "
            "files (sites holding the old secret key could no longer decrypt); pass --force to "
            "replace them"
        )
    ctx = new_context(params)
    public = public_bytes(ctx)
    _write_private(secret_path, secret_bytes(ctx))
    _write_atomic(public_path, public, 0o644)
    return KeyFiles(secret_path, public_path, fingerprint_bytes(public), params)


def load_public_context(path: Path | str, expected_fingerprint: str | None = None):
    """The coordinator's context: refuses a file that contains a secret key."""
    ctx, fp = _read_context(Path(path))
    if ctx.is_private():
        raise CKKSKeyError(
            f"{path} is a SECRET context (it contains the secret key); the coordinator must "
            f"load {PUBLIC_FILE}, and {SECRET_FILE} belongs only at the sites"
        )
    _check_expected(path, fp, expected_fingerprint)
    return ctx


def load_secret_context(path: Path | str, expected_fingerprint: str | None = None):
    """A site's context: refuses a public context and a file group or others can read."""
    path = Path(path)
    ctx, fp = _read_context(path)
    if not ctx.is_private():
        raise CKKSKeyError(
            f"{path} is a PUBLIC context (no secret key); a site needs {SECRET_FILE} from the "
            "federation's key administrator"
        )
    mode = _file_mode(path)
    if _mode_too_open(mode):
        raise CKKSKeyError(
            f"{path} holds the CKKS secret key but is readable by group or others (mode "
            f"{mode:04o}); run `chmod 600 {path}` (and check who could have copied it)"
        )
    _check_expected(path, fp, expected_fingerprint)
    return ctx


def describe_key_file(path: Path | str) -> tuple[KeyKind, str]:
    """(kind, fingerprint) of a key file; both files of one key set have the same fingerprint."""
    info = key_file_info(path)
    return info.kind, info.fingerprint


def key_file_info(path: Path | str) -> KeyFileInfo:
    """Kind, fingerprint, parameters and file mode of a key file (never refuses a loose mode)."""
    path = Path(path)
    mode = _file_mode(path)
    ctx, fp = _read_context(path)
    kind: KeyKind = "secret" if ctx.is_private() else "public"
    return KeyFileInfo(path, kind, fp, params_of(ctx), mode)


# --- internals ---------------------------------------------------------------------------------
def _read_context(path: Path):
    import tenseal as ts

    if not path.is_file():
        raise CKKSKeyError(f"{path} does not exist (create keys with `fedcl keys init --out DIR`)")
    data = path.read_bytes()
    try:
        ctx = ts.context_from(data, n_threads=1)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError on bad bytes
        raise CKKSKeyError(f"{path} is not a TenSEAL context: {exc}") from None
    try:
        scheme = ctx.seal_context().data.key_context_data().parms().scheme()
        is_ckks = getattr(scheme, "name", str(scheme)).endswith("CKKS")
        has_public = ctx.has_public_key()
    except Exception:  # symmetric contexts raise on has_public_key
        is_ckks, has_public = True, False
    if not is_ckks:
        raise CKKSKeyError(f"{path} is not a CKKS context")
    if not has_public:
        raise CKKSKeyError(
            f"{path} has no public key (a symmetric context?): create keys with `fedcl keys init`"
        )
    return ctx, fingerprint(ctx)


def _check_expected(path, fp: str, expected: str | None) -> None:
    if expected and fp != expected.lower():
        raise CKKSKeyError(
            f"{path} has fingerprint {short(fp)}…, but the federation uses {short(expected)}…: "
            "this is another key set"
        )


def _file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise CKKSKeyError(
            f"{path} does not exist (create keys with `fedcl keys init --out DIR`)"
        ) from None


def _mode_too_open(mode: int) -> bool:
    return os.name != "nt" and bool(mode & 0o077)


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file created with ``mode`` (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)  # exactly ``mode``, whatever the umask says
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
