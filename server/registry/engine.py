"""Connecting to the registry database: URL checks, per-backend engine settings, migration.

Kept apart from the queries because it is the part that differs between SQLite and PostgreSQL,
and the part whose failures an operator sees first: every error here names the (password-masked)
URL and says what to fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from . import migrate
from .errors import RegistryError, mask_url

_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PG_CONNECT_TIMEOUT_S = 10


def default_sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of a SQLite registry file, made absolute so a later ``chdir`` is harmless."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def error_reason(exc: BaseException, password: str | None) -> str:
    """One-line reason for an error, with the password scrubbed in case a driver echoes it."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    text = str(orig if orig is not None else exc)
    text = " ".join(text.split()) or type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return text


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or ``None`` for in-memory and URI-style databases."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or url.query.get("uri") in ("true", "1"):
        return None
    return Path(database).expanduser().resolve()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings the registry relies on.

    busy_timeout first, so switching the journal mode waits for locks instead of failing; WAL lets
    readers (CLI, dashboard) work while the coordinator writes; foreign keys are off by default in
    SQLite and the schema depends on them (and on ON DELETE CASCADE).
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode not in ("wal", "memory"):
            cursor.execute("PRAGMA journal_mode = WAL")
        # NORMAL is crash-safe in WAL mode and avoids an fsync per commit.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        kwargs: dict[str, Any] = {}
        if _sqlite_file(url) is None:
            # One shared connection, or each pooled connection would see its own empty database.
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        # Without it an unreachable host hangs the coordinator for minutes before failing.
        connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


@dataclass(frozen=True)
class Database:
    """A migrated engine, the URL to show for it, and where its artifacts live by default."""

    engine: Engine
    shown_url: str
    default_artifacts_dir: Path


def open_database(url: str) -> Database:
    """Connect to ``url`` and upgrade the schema to head.

    Artifacts default to ``<db folder>/artifacts`` for SQLite files (so a registry is one
    self-contained folder) and ``./fedcl-artifacts`` otherwise.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RegistryError(f"cannot open registry at {mask_url(url)}: {exc}") from None
    shown = parsed.render_as_string(hide_password=True)
    db_file = _sqlite_file(parsed)
    if db_file is not None:
        try:
            db_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(
                f"cannot open registry at {shown}: cannot create folder {db_file.parent}: "
                f"{exc.strerror or exc}"
            ) from None
    engine: Engine | None = None
    try:
        engine = _create_engine(parsed)
        migrate.upgrade(engine)
    except CommandError as exc:
        if engine is not None:
            engine.dispose()
        raise RegistryError(
            f"cannot open registry at {shown}: schema migration failed ({exc}); if the "
            "database was created by a newer fedcl, upgrade fedcl"
        ) from None
    except (SQLAlchemyError, OSError, ImportError) as exc:
        if engine is not None:
            engine.dispose()
        reason = error_reason(exc, parsed.password)
        raise RegistryError(f"cannot open registry at {shown}: {reason}") from None
    if db_file is not None:
        artifacts = db_file.parent / "artifacts"
    else:
        artifacts = Path("fedcl-artifacts").resolve()
    return Database(engine, shown, artifacts)
