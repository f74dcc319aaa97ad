"""Programmatic Alembic: the only way the registry schema is created or changed.

``Registry.open`` calls :func:`upgrade` so a coordinator never runs against a stale schema and
nobody has to remember ``alembic upgrade head``. The Alembic ``Config`` is built in code pointing
at the packaged ``migrations`` folder, so no ``alembic.ini`` is needed at runtime; the shipped
``alembic.ini`` is only for operators running ``alembic`` by hand.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"
# Alembic's ``context`` and ``op`` are module-level proxies, set for the migration that runs:
# two threads of one process migrating at once (the dashboard's request threads, a test that
# reads the registry while an in-process run writes it) overwrite each other's (KeyError).
_MIGRATING = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged migrations, optionally bound to an open connection.

    Passing the connection (rather than a URL) lets migrations run inside the caller's engine, so
    per-connection settings such as SQLite pragmas or a PostgreSQL ``search_path`` apply to them
    and Alembic's version table lands in the same schema as the registry tables.
    """
    cfg = Config()
    # ConfigParser interpolates '%'; escape it in case the install path contains one.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` in one transaction.

    A database already at the head is left alone without running Alembic's environment, so
    opening the registry (every poll of `coordinator status`, every dashboard request) is cheap.
    """
    if revision == "head" and current_revision(engine) == head_revision():
        return
    with _MIGRATING, engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Downgrade the database behind ``engine`` to ``revision`` (``base`` drops every table)."""
    with _MIGRATING, engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty (never migrated) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@cache
def head_revision() -> str | None:
    """The newest revision shipped with this version of fedcl (fixed for a process)."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
