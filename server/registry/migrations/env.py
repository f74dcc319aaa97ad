"""Alembic environment for the fedcl coordinator registry.

Two ways in: ``fedcl.server.registry.migrate`` passes an open connection through
``config.attributes["connection"]`` (the normal path, used by ``Registry.open``); an operator
running ``alembic -c server/registry/alembic.ini -x url=... upgrade head`` gets an engine built
from ``-x url=``, ``$FEDCL_REGISTRY_URL`` or ``sqlalchemy.url`` in that order.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from fedcl.server.registry.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("FEDCL_REGISTRY_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        raise RuntimeError(
            "no registry URL: pass `-x url=...`, set FEDCL_REGISTRY_URL, "
            "or set sqlalchemy.url in alembic.ini"
        )
    return url


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so later migrations rebuild tables.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the caller's connection, or one built from the URL when run by hand."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


# Only configure logging when run from the command line: inside the coordinator (or pytest) the
# host application owns logging and must not have its loggers reset.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
