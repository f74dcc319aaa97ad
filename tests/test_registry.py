"""Tests of the coordinator registry on SQLite and (when configured) PostgreSQL.

Backends come from the ``registry_url`` / ``registry`` fixtures in conftest.py.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text
from sqlalchemy.pool import NullPool

from fedcl.server.registry import (
    MetricRow,
    Registry,
    RegistryError,
    default_sqlite_url,
    migrate,
)
from fedcl.server.registry.models import ApiToken, Base, Round

REGISTRY_TABLES = {
    "drift_events",
    "task_starts",
    "runs",
    "tasks",
    "rounds",
    "sites",
    "participations",
    "metrics",
    "model_versions",
    "privacy_spend",
    "audit_events",
    "audit_chain_head",
    "api_tokens",
    "dashboard_sessions",
}
CONFIG = {"strategy": "fedavg", "rounds_per_task": 2, "dp": {"epsilon": 8.0}, "seeds": (1, 2)}
TASKS = ["digits-0-4", "digits-5-9"]


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    """A throwaway engine on the test database (NullPool so nothing outlives the test)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _new_run(reg: Registry, run_id: str = "run-1") -> None:
    reg.create_run(run_id, name="Split MNIST", scenario="split-mnist", config=CONFIG, tasks=TASKS)


# ---------------------------------------------------------------------------------- migrations


def test_migrations_upgrade_downgrade_upgrade(registry_url: str) -> None:
    with Registry.open(registry_url) as reg:
        _new_run(reg)
    with _engine(registry_url) as engine:
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert _tables(engine) == REGISTRY_TABLES | {"alembic_version"}

        # Downgrade with the shipped alembic.ini, the way an operator would by hand.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(migrate.ALEMBIC_INI),
                "-x",
                f"url={registry_url}",
                "downgrade",
                "base",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert migrate.current_revision(engine) is None
        assert _tables(engine) <= {"alembic_version"}

        migrate.upgrade(engine)
        assert _tables(engine) == REGISTRY_TABLES | {"alembic_version"}
        migrate.downgrade(engine)
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()

    with Registry.open(registry_url) as reg:
        assert reg.list_runs() == []
        _new_run(reg)
        assert [r.id for r in reg.list_runs()] == ["run-1"]


def test_migrations_match_models(registry_url: str) -> None:
    """The hand-written migration and the ORM models describe the same schema."""
    Registry.open(registry_url).close()
    with _engine(registry_url) as engine, engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_registry_open_is_idempotent_and_sqlite_is_wal(tmp_path: Path) -> None:
    url = default_sqlite_url(tmp_path / "nested" / "dir" / "registry.db")
    with Registry.open(url) as reg:
        assert reg.artifacts_dir == tmp_path / "nested" / "dir" / "artifacts"
        _new_run(reg)
    with Registry.open(url) as reg, reg._engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() > 0
        assert reg.get_run("run-1") is not None


# ---------------------------------------------------------------------------------- errors


def test_bad_url_names_url_with_password_masked() -> None:
    url = "postgresql+psycopg://fedcl:hunter2@127.0.0.1:1/fedcl?connect_timeout=3"
    with pytest.raises(RegistryError) as excinfo:
        Registry.open(url)
    message = str(excinfo.value)
    assert message.startswith("cannot open registry at postgresql+psycopg://fedcl:***@127.0.0.1:1")
    assert "hunter2" not in message


def test_unparseable_url_and_unusable_sqlite_path(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"cannot open registry at not-a-url"):
        Registry.open("not-a-url")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RegistryError, match=str(blocker)):
        Registry.open(default_sqlite_url(blocker / "registry.db"))


def test_enum_like_values_are_validated(registry: Registry) -> None:
    _new_run(registry)
    with pytest.raises(RegistryError, match=r"'paused'.*running, completed, failed, stopped"):
        registry.set_run_status("run-1", "paused")
    with pytest.raises(RegistryError, match=r"'eval'.*train, consolidate"):
        registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1, kind="eval")
    rid = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
    with pytest.raises(RegistryError, match=r"'fit'.*train, evaluate, consolidate"):
        registry.record_participation(rid, "site-0", phase="fit", status="ok")
    with pytest.raises(RegistryError, match=r"'timeout'.*ok, failed, refused, rejected"):
        registry.record_participation(rid, "site-0", phase="train", status="timeout")
    with pytest.raises(RegistryError, match=r"unknown run 'nope'"):
        registry.begin_round("nope", task_index=0, round_in_task=1, server_round=1)
    with pytest.raises(RegistryError, match="invalid run id"):
        _new_run(registry, "../escape")


# ---------------------------------------------------------------------------------- runs


def test_create_run_resume_and_config_mismatch(registry: Registry) -> None:
    created = registry.create_run(
        "run-1", name="Split MNIST", scenario="split-mnist", config=CONFIG, tasks=TASKS
    )
    assert created.status == "running"
    assert created.tasks == TASKS
    assert created.config["seeds"] == [1, 2]
    assert created.created_at.tzinfo is not None
    assert created.created_at.utcoffset() == UTC.utcoffset(None)

    resumed = registry.create_run(
        "run-1", name="Split MNIST", scenario="split-mnist", config=dict(CONFIG), tasks=TASKS
    )
    assert resumed == created

    changed = {**CONFIG, "rounds_per_task": 3, "dp": {"epsilon": 1.0}, "new_key": True}
    with pytest.raises(RegistryError) as excinfo:
        registry.create_run("run-1", name="x", scenario="split-mnist", config=changed, tasks=TASKS)
    message = str(excinfo.value)
    assert "'run-1'" in message
    assert "dp, new_key, rounds_per_task" in message
    assert "strategy" not in message

    with pytest.raises(RegistryError, match="tasks differ"):
        registry.create_run("run-1", name="x", scenario="s", config=CONFIG, tasks=["only-one"])

    registry.set_run_status("run-1", "failed", reason="site quorum lost")
    failed = registry.get_run("run-1")
    assert failed is not None
    assert (failed.status, failed.reason) == ("failed", "site quorum lost")
    assert failed.finished_at is not None
    registry.set_run_status("run-1", "running")
    running = registry.get_run("run-1")
    assert running is not None and running.finished_at is None
    assert registry.get_run("missing") is None

    _new_run(registry, "run-2")
    assert [r.id for r in registry.list_runs()] == ["run-2", "run-1"]
    assert [r.id for r in registry.list_runs(limit=1, offset=1)] == ["run-1"]


# ---------------------------------------------------------------------------------- rounds


def test_round_lifecycle_counts_derived_from_participations(registry: Registry) -> None:
    _new_run(registry)
    rid = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
    registry.record_participation(rid, "site-0", phase="train", status="ok", num_examples=600)
    registry.record_participation(rid, "site-1", phase="train", status="ok", num_examples=400)
    registry.record_participation(rid, "site-2", phase="train", status="failed", detail="OOM")
    registry.record_participation(rid, "site-3", phase="train", status="refused", detail="budget")
    registry.record_participation(rid, "site-4", phase="train", status="rejected")
    # Evaluate-phase rows do not count towards the training round's participants.
    registry.record_participation(rid, "site-0", phase="evaluate", status="ok", num_examples=100)
    registry.record_participation(rid, "site-2", phase="evaluate", status="ok")
    # A retry overwrites instead of duplicating.
    registry.record_participation(rid, "site-1", phase="train", status="ok", num_examples=450)

    (running,) = registry.list_rounds("run-1")
    assert (running.status, running.num_participants) == ("running", 0)

    registry.complete_round(rid, seconds=12.5, bytes_up=3_000_000_000, bytes_down=2_000_000_000)
    (done,) = registry.list_rounds("run-1")
    assert done.status == "completed"
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert (done.seconds, done.bytes_up, done.bytes_down) == (12.5, 3_000_000_000, 2_000_000_000)
    assert (done.num_participants, done.num_failures, done.num_refusals) == (2, 2, 1)

    parts = registry.list_participations("run-1", round_id=rid)
    assert len(parts) == 7
    site1 = registry.list_participations("run-1", site_id="site-1")
    assert [(p.phase, p.num_examples, p.server_round) for p in site1] == [("train", 450, 1)]
    assert [s.id for s in registry.list_sites()] == [f"site-{i}" for i in range(5)]
    site0 = registry.list_sites()[0]
    assert site0.first_seen <= site0.last_seen

    with pytest.raises(RegistryError, match="completed"):
        registry.complete_round(rid, seconds=1, bytes_up=0, bytes_down=0)

    rid2 = registry.begin_round(
        "run-1", task_index=0, round_in_task=2, server_round=2, kind="consolidate"
    )
    registry.fail_round(rid2, "all sites timed out")
    assert registry.list_rounds("run-1")[1].status == "failed"
    assert "all sites timed out" in registry.list_audit(run_id="run-1")[0].message


def test_crashed_round_is_reset_by_begin_round(registry: Registry) -> None:
    _new_run(registry)
    r1 = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
    registry.record_participation(r1, "site-0", phase="train", status="ok", num_examples=10)
    registry.complete_round(r1, seconds=1.0, bytes_up=1, bytes_down=1)

    # The coordinator dies in the middle of server round 2...
    r2 = registry.begin_round("run-1", task_index=0, round_in_task=2, server_round=2)
    registry.record_participation(r2, "site-0", phase="train", status="ok", num_examples=10)
    registry.record_metrics("run-1", r2, [MetricRow("loss", 0.5)])
    partial = registry.save_model_version(
        "run-1", r2, task_index=0, server_round=2, payload=b"partial", encrypted=False, format="pt"
    )
    privacy_kept = dict(epsilon_run=0.4, epsilon_lifetime=0.4, delta=1e-5, budget=8.0)
    registry.record_privacy("run-1", r2, "site-0", **privacy_kept)

    last = registry.last_completed_round("run-1")
    assert last is not None and last.server_round == 1

    # ...and on restart begins it again: same row, partial results discarded.
    again = registry.begin_round("run-1", task_index=0, round_in_task=2, server_round=2)
    assert again == r2
    assert registry.list_participations("run-1", round_id=r2) == []
    assert registry.list_metrics("run-1", round_id=r2) == []
    assert registry.list_model_versions("run-1") == []
    assert not (registry.artifacts_dir / partial.path).exists()
    assert len(registry.list_privacy("run-1")) == 1
    assert registry.list_audit(run_id="run-1")[0].kind == "round.reset"
    (_, reset) = registry.list_rounds("run-1")
    assert reset.status == "running"

    registry.complete_round(r2, seconds=2.0, bytes_up=2, bytes_down=2)
    last = registry.last_completed_round("run-1")
    assert last is not None and (last.server_round, last.id) == (2, r2)

    with pytest.raises(RegistryError, match="server round 2 of run 'run-1' is already completed"):
        registry.begin_round("run-1", task_index=0, round_in_task=2, server_round=2)
    assert registry.last_completed_round("other") is None


# ---------------------------------------------------------------------------------- metrics


def test_metrics_query_joins_round_and_task(registry: Registry) -> None:
    _new_run(registry)
    r1 = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
    r2 = registry.begin_round("run-1", task_index=1, round_in_task=1, server_round=2)
    registry.record_metrics(
        "run-1",
        r1,
        [
            MetricRow("accuracy", 0.9, task_index=0),
            MetricRow("accuracy", 0.8, site_id="site-0", task_index=0),
            MetricRow("train_loss", 0.3, site_id="site-0"),
        ],
    )
    registry.record_metrics(
        "run-1",
        r2,
        [
            MetricRow("accuracy", 0.6, task_index=0),  # forgetting on task 0 ...
            MetricRow("accuracy", 0.95, task_index=1),  # ... while learning task 1
            MetricRow("loss", math.nan),
        ],
    )
    registry.record_metrics("run-1", None, [MetricRow("final_accuracy", 0.77)])

    federation = registry.list_metrics("run-1", name="accuracy", site_id=None)
    assert [(m.server_round, m.round_task_index, m.task_index, m.value) for m in federation] == [
        (1, 0, 0, 0.9),
        (2, 1, 0, 0.6),
        (2, 1, 1, 0.95),
    ]
    all_accuracy = registry.list_metrics("run-1", name="accuracy")
    assert len(all_accuracy) == 4
    per_site = registry.list_metrics("run-1", site_id="site-0")
    assert {(m.name, m.site_id) for m in per_site} == {
        ("accuracy", "site-0"),
        ("train_loss", "site-0"),
    }
    assert len(registry.list_metrics("run-1", round_id=r2)) == 3
    (nan_loss,) = registry.list_metrics("run-1", name="loss")
    assert math.isnan(nan_loss.value)
    (run_level,) = registry.list_metrics("run-1", name="final_accuracy")
    assert (run_level.round_id, run_level.server_round, run_level.value) == (None, None, 0.77)

    _new_run(registry, "run-2")
    with pytest.raises(RegistryError, match="belongs to run 'run-1'"):
        registry.record_metrics("run-2", r1, [MetricRow("accuracy", 1.0)])


# ---------------------------------------------------------------------------------- models


def test_model_version_artifact_roundtrip_and_corruption(registry: Registry) -> None:
    _new_run(registry)
    rid = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=7)
    payload = b"\x00safetensors-bytes\xff" * 1000
    version = registry.save_model_version(
        "run-1",
        rid,
        task_index=0,
        server_round=7,
        payload=payload,
        encrypted=False,
        format="safetensors",
    )
    assert version.path == "run-1/round-00007.safetensors"
    assert version.sha256 == hashlib.sha256(payload).hexdigest()
    assert version.size_bytes == len(payload)
    assert (version.status, version.encrypted) == ("candidate", False)
    on_disk = registry.artifacts_dir / version.path
    assert on_disk.read_bytes() == payload
    assert [p.name for p in on_disk.parent.iterdir()] == [on_disk.name]  # no temp files left

    assert registry.load_artifact(version) == payload
    assert registry.load_artifact(version.id) == payload

    encrypted = registry.save_model_version(
        "run-1", None, task_index=0, server_round=8, payload=b"ckks", encrypted=True, format="ckks"
    )
    assert registry.latest_model_version("run-1") == encrypted
    assert [v.id for v in registry.list_model_versions("run-1")] == [version.id, encrypted.id]
    assert registry.list_model_versions("other") == []

    on_disk.write_bytes(payload[:-1] + b"X")
    with pytest.raises(RegistryError) as excinfo:
        registry.load_artifact(version.id)
    message = str(excinfo.value)
    assert str(on_disk) in message
    assert version.sha256 in message
    assert hashlib.sha256(on_disk.read_bytes()).hexdigest() in message

    on_disk.unlink()
    with pytest.raises(RegistryError, match=rf"{on_disk}.*missing"):
        registry.load_artifact(version)


def test_version_status_change_is_audited(registry: Registry) -> None:
    _new_run(registry)
    v1 = registry.save_model_version(
        "run-1", None, task_index=0, server_round=1, payload=b"v1", encrypted=False, format="pt"
    )
    v2 = registry.save_model_version(
        "run-1", None, task_index=0, server_round=2, payload=b"v2", encrypted=False, format="pt"
    )
    promoted = registry.set_version_status(v1.id, "production", actor="alice")
    assert promoted.status == "production"
    event = registry.list_audit(run_id="run-1")[0]
    assert (event.kind, event.actor) == ("model_version.status", "alice")
    assert f"model version {v1.id}" in event.message and "candidate -> production" in event.message

    with pytest.raises(RegistryError, match="refusing to overwrite production"):
        registry.save_model_version(
            "run-1", None, task_index=0, server_round=1, payload=b"x", encrypted=False, format="pt"
        )

    registry.set_version_status(v2.id, "production", actor="bob")
    statuses = {v.id: v.status for v in registry.list_model_versions("run-1")}
    assert statuses == {v1.id: "archived", v2.id: "production"}
    assert {e.actor for e in registry.list_audit(run_id="run-1", limit=2)} == {"bob"}

    registry.set_version_status(v2.id, "rolled_back", actor="bob")
    latest = registry.latest_model_version("run-1")
    assert latest is not None and latest.id == v1.id
    with pytest.raises(RegistryError, match="'deployed'.*candidate, production"):
        registry.set_version_status(v1.id, "deployed", actor="bob")


# ---------------------------------------------------------------------------------- privacy/audit


def test_privacy_and_audit(registry: Registry) -> None:
    _new_run(registry)
    rid = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
    registry.record_privacy(
        "run-1", rid, "site-0", epsilon_run=0.5, epsilon_lifetime=2.5, delta=1e-5, budget=8.0
    )
    registry.record_privacy(
        "run-1", None, "site-1", epsilon_run=0.7, epsilon_lifetime=0.7, delta=1e-5, budget=None
    )
    rows = registry.list_privacy("run-1")
    assert [(p.site_id, p.server_round, p.budget) for p in rows] == [
        ("site-0", 1, 8.0),
        ("site-1", None, None),
    ]
    assert [p.epsilon_lifetime for p in registry.list_privacy("run-1", "site-0")] == [2.5]

    registry.audit("site.rejected", "unknown site tried to join", site_id="site-x", actor="coord")
    (event,) = registry.list_audit(limit=1)
    assert (event.kind, event.site_id, event.actor, event.run_id) == (
        "site.rejected",
        "site-x",
        "coord",
        None,
    )
    assert event.created_at.tzinfo is not None


# ---------------------------------------------------------------------------------- tokens


def test_tokens_store_only_the_hash(registry: Registry) -> None:
    token = registry.create_token("ci-dashboard", "viewer")
    info = registry.verify_token(token)
    assert info is not None and (info.name, info.role) == ("ci-dashboard", "viewer")
    assert registry.verify_token(token + "x") is None
    assert registry.verify_token("") is None

    with registry._sessions() as session:
        stored = session.scalars(select(ApiToken.token_hash)).all()
    assert stored == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in stored

    revoked = registry.revoke_token(info.id, actor="admin")
    assert revoked.revoked_at is not None
    assert registry.verify_token(token) is None


# ---------------------------------------------------------------------------------- concurrency


def test_concurrent_reader_sees_committed_rounds(tmp_path: Path) -> None:
    """A CLI opening the coordinator's SQLite file reads while the coordinator is writing."""
    url = default_sqlite_url(tmp_path / "registry.db")
    with Registry.open(url) as writer:
        _new_run(writer)
        r1 = writer.begin_round("run-1", task_index=0, round_in_task=1, server_round=1)
        writer.complete_round(r1, seconds=1.0, bytes_up=1, bytes_down=1)

        # The writer holds an uncommitted write transaction (mid-flush) while the reader opens.
        with writer._sessions.begin() as pending:
            pending.add(
                Round(
                    run_id="run-1",
                    task_index=0,
                    round_in_task=2,
                    server_round=2,
                    kind="train",
                    status="running",
                )
            )
            pending.flush()
            started = time.monotonic()
            with Registry.open(url) as reader:
                assert [r.server_round for r in reader.list_rounds("run-1")] == [1]
                last = reader.last_completed_round("run-1")
                assert last is not None and last.id == r1
            assert time.monotonic() - started < 5, "reader waited for the writer's lock"

        with Registry.open(url) as reader:
            assert [r.server_round for r in reader.list_rounds("run-1")] == [1, 2]
        r3 = writer.begin_round("run-1", task_index=1, round_in_task=1, server_round=3)
        writer.complete_round(r3, seconds=1.0, bytes_up=1, bytes_down=1)
        with Registry.open(url) as reader:
            last = reader.last_completed_round("run-1")
            assert last is not None and last.server_round == 3


def test_closed_registry_raises(tmp_path: Path) -> None:
    reg = Registry.open(default_sqlite_url(tmp_path / "r.db"))
    reg.close()
    with pytest.raises(RegistryError, match="closed"):
        reg.list_runs()


def _round_writes(registry: Registry, rid: int) -> None:
    """What the coordinator writes about one round: participations, then two metric writes."""
    from fedcl.server.registry.participations import ParticipationRow

    sites = ["site-0", "site-1", "site-2"]
    registry.record_participations(rid, [ParticipationRow(s, "train", "ok", 10) for s in sites])
    registry.record_metrics(
        "run-1", rid, [MetricRow("accuracy", 0.5 + i / 10, site_id=s) for i, s in enumerate(sites)]
    )
    registry.record_metrics("run-1", rid, [MetricRow("train_loss", 1.25)])
    registry.complete_round(rid, seconds=1.0, bytes_up=1, bytes_down=2)


def test_a_batch_looks_up_run_round_and_sites_once(registry: Registry) -> None:
    """Inside one batch the same run, round and sites are selected once, not once per write,
    and the rows written are the same as without a batch; the next batch selects them again."""
    from sqlalchemy import event

    _new_run(registry)
    statements: list[str] = []

    def note(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    def lookups(table: str) -> int:
        return sum(s.startswith("SELECT") and f"FROM {table} " in s + " " for s in statements)

    rid1 = registry.begin_round("run-1", task_index=0, round_in_task=0, server_round=1)
    _round_writes(registry, rid1)  # one transaction per call, as before batches
    rid2 = registry.begin_round("run-1", task_index=0, round_in_task=1, server_round=2)
    event.listen(registry._engine, "before_cursor_execute", note)
    try:
        with registry.batch():
            _round_writes(registry, rid2)
        assert (lookups("runs"), lookups("rounds"), lookups("sites")) == (1, 1, 1)
        statements.clear()
        rid3 = registry.begin_round("run-1", task_index=1, round_in_task=0, server_round=3)
        with registry.batch():
            _round_writes(registry, rid3)
        assert lookups("runs") >= 1 and lookups("sites") == 1  # nothing kept across sessions
    finally:
        event.remove(registry._engine, "before_cursor_execute", note)

    def rows(rid: int) -> tuple[list, list]:
        listed = registry.list_metrics("run-1", round_id=rid)
        metrics = [(m.name, m.value, m.site_id) for m in listed]
        parts = [
            (p.site_id, p.phase, p.status, p.num_examples)
            for p in registry.list_participations("run-1", round_id=rid)
        ]
        return metrics, parts

    assert rows(rid1) == rows(rid2) == rows(rid3)
    assert len(rows(rid1)[0]) == 4 and len(rows(rid1)[1]) == 3
    by_round = {r.id: r for r in registry.list_rounds("run-1")}
    assert {by_round[r].num_participants for r in (rid1, rid2, rid3)} == {3}
    assert [s.id for s in registry.list_sites()] == ["site-0", "site-1", "site-2"]


def test_record_participations_overwrites_and_keeps_the_last_of_duplicates(
    registry: Registry,
) -> None:
    """New rows go in as one INSERT, rows already there are updated: a retry of the round (or a
    site named twice in one call) leaves one row per (site, phase) with the last values."""
    from fedcl.server.registry.participations import ParticipationRow as Row

    _new_run(registry)
    rid = registry.begin_round("run-1", task_index=0, round_in_task=0, server_round=1)
    registry.record_participations(
        rid, [Row("site-1", "train", "failed", 0, "no reply"), Row("site-0", "train", "ok", 5)]
    )
    with registry.batch():
        registry.record_participations(
            rid,
            [
                Row("site-1", "train", "ok", 7),  # the retry answered
                Row("site-2", "train", "ok", 3),
                Row("site-2", "train", "refused", 0, "budget"),  # named twice: the last wins
                Row("site-0", "evaluate", "ok", 9),
            ],
        )
    got = [
        (p.site_id, p.phase, p.status, p.num_examples, p.detail)
        for p in registry.list_participations("run-1", round_id=rid)
    ]
    assert got == [
        ("site-0", "train", "ok", 5, None),
        ("site-0", "evaluate", "ok", 9, None),
        ("site-1", "train", "ok", 7, None),
        ("site-2", "train", "refused", 0, "budget"),
    ]
