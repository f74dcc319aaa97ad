"""Shared pytest fixtures. Each feature keeps its fixtures in its own clearly marked section."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcl.server.registry import Registry

# ==============================================================================================
# Order: the longest files first
#
# The suite runs on two xdist workers that take tests in this order, two at a time
# (pyproject's addopts). Started last, the real-process tests (minutes each, mostly waiting on
# Flower's heartbeats and polls) ran one after the other at the end; started first, the quick
# ones fill in around them. The two fault tests, first, go to one worker and share its
# federation. Alone on 2 cores (2026-12-01): deployment_tls 122 s, faults_processes 235 s; in
# the whole run 164 s and 243 s, the rest of the suite filling the other worker.
# ==============================================================================================
LONGEST_FIRST = ("test_faults_processes.py", "test_deployment_tls.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as before


# ==============================================================================================
# Registry database fixtures (fedcl.server.registry)
#
# ``registry_url`` is parametrized over backends: ``sqlite`` (a fresh file under tmp_path)
# always, ``postgres`` when FEDCL_TEST_DATABASE_URL is set, e.g.
#   FEDCL_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test
# Each PostgreSQL test gets its own schema (selected through the connection's search_path, so
# Alembic's version table lands there too), dropped afterwards.
# ==============================================================================================

REGISTRY_PG_ENV = "FEDCL_TEST_DATABASE_URL"
REGISTRY_PG_SKIP = "set FEDCL_TEST_DATABASE_URL to run registry tests against PostgreSQL"


def _registry_postgres_schema_url(base_url: str) -> Iterator[str]:
    """Create a throwaway schema and yield a URL whose connections use it as search_path."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    schema = f"t_{uuid.uuid4().hex}"
    admin = create_engine(base_url, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url)
        options = " ".join(filter(None, [url.query.get("options"), f"-csearch_path={schema}"]))
        yield url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty registry database on each available backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry' / 'registry.db'}"
        return
    base_url = os.environ.get(REGISTRY_PG_ENV)
    if not base_url:
        pytest.skip(REGISTRY_PG_SKIP)
    yield from _registry_postgres_schema_url(base_url)


@pytest.fixture
def registry(registry_url: str, tmp_path: Path) -> Iterator[Registry]:
    """An open, migrated ``Registry`` whose artifacts go to ``tmp_path / "artifacts"``."""
    reg = Registry.open(registry_url, artifacts_dir=tmp_path / "artifacts")
    try:
        yield reg
    finally:
        reg.close()


# ==============================================================================================


# ==============================================================================================
# DP-SGD unit tests (tests/test_dp*.py): one torch thread, Opacus' expected warnings muted
#
# Tiny batches: one intra-op thread is faster and steadier on a shared 2-core box. Modules use
# them with ``pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")``.
# ==============================================================================================


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def quiet_opacus() -> Iterator[None]:
    """Opacus' notices that every DP-SGD test triggers by design (hooks on a full backward,
    noise from torch's PRNG rather than a CSPRNG)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        yield


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages built outside a Flower runtime need a task identity (as LocalGrid sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
