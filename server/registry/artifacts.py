"""Model artifacts on disk: written atomically, read back only if their SHA-256 still matches.

The database row of a model version holds the path and digest; the bytes live in files under the
artifacts folder, so a large model never bloats the database (or its backups) and can be copied
out with ordinary tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import RegistryError
from .info import ModelVersionInfo


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_verified(path: Path, version: ModelVersionInfo) -> bytes:
    """The file's bytes, refusing anything whose SHA-256 differs from the version's.

    A silently corrupted (or swapped) model file would otherwise be deployed or resumed from.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(
            f"model artifact {path} of version {version.id} (run {version.run_id!r}, server "
            f"round {version.server_round}) is missing; expected sha256 {version.sha256}"
        ) from None
    except OSError as exc:
        raise RegistryError(f"cannot read model artifact {path}: {exc.strerror or exc}") from None
    actual = sha256_of(data)
    if actual != version.sha256:
        raise RegistryError(
            f"model artifact {path} of version {version.id} is corrupt: expected sha256 "
            f"{version.sha256}, file has sha256 {actual} ({len(data)} bytes)"
        )
    return data


def unlink_quietly(paths: Iterable[Path]) -> None:
    """Best effort: a leftover file is harmless (the next save of that round overwrites it)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
