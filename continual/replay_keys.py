"""The site's replay key: the secret that decides, by keyed hash, which examples a buffer keeps.

It lives in the site's top-level state folder (``replay.key``, 32 bytes, mode 0600), is created
once and shared by all of the site's runs, and never leaves the site: without it nobody can tell
which examples a buffer would keep (:mod:`fedcl.continual.replay`). A site that sets its
research seed (``privacy.research_seed``, simulations and tests only) derives the key from it
instead, so its buffers and drift samples repeat from run to run like its DP noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path

from fedcl.config import FedclError

KEY_FILE = "replay.key"
KEY_BYTES = 32


def load_or_create_key(
    state_dir: str | os.PathLike[str], *, research_seed: int | None = None
) -> bytes:
    """The site's replay key, ``state_dir/replay.key``: created once (mode 0600), then reused.

    With ``research_seed`` (the site's ``privacy.research_seed``) the key is derived from it and no
    file is read or written: anyone who knows the seed knows the key.

    Creation is atomic (a complete temporary file is hard-linked into place, which fails if
    another process got there first, whose key is then used), so concurrent first messages of
    one site agree on one key. A key file readable by anyone but its owner is refused.
    """
    if research_seed is not None:
        text = f"fedcl-replay-key/{int(research_seed)}".encode()
        return hashlib.blake2b(text, digest_size=KEY_BYTES).digest()
    folder = Path(state_dir)
    path = folder / KEY_FILE
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + KEY_FILE + ".", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)  # whatever the umask says
                fh.write(secrets.token_bytes(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process created it first
                os.link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        key = path.read_bytes()
    except OSError as exc:
        raise FedclError(f"replay key {path} cannot be read: {exc}") from exc
    if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
        raise FedclError(
            f"replay key {path} has mode {oct(stat.S_IMODE(mode))}: it must be private to the "
            f"site (chmod 600 {path})"
        )
    if len(key) != KEY_BYTES:
        raise FedclError(
            f"replay key {path} holds {len(key)} bytes, not {KEY_BYTES}: it is damaged; remove "
            "it (the buffers are rebuilt from the site's data with a new key)"
        )
    return key


def seed_key(seed: int) -> bytes:
    """A public key from a seed (for buffers built without a site key)."""
    return hmac.digest(b"fedcl-replay/seed-key", str(int(seed)).encode(), "sha256")


def key_id(key: bytes) -> str:
    return hmac.digest(key, b"fedcl-replay/key-id", "sha256")[:8].hex()
