"""The registry facade the coordinator, CLI and dashboard use.

Every public method is one short transaction on a shared ``sessionmaker`` and returns frozen
snapshots (``info.py``), never ORM objects. Short transactions matter on SQLite: the coordinator
is the only writer, and a CLI or dashboard reading the same file (WAL mode) must never wait on a
transaction the coordinator left open across a Flower round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import Any, Self

from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, delete, event, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.pool import StaticPool

from . import migrate
from .errors import RegistryError, mask_url
from .info import (
    AuditInfo,
    MetricInfo,
    MetricRow,
    ModelVersionInfo,
    ParticipationInfo,
    PrivacyInfo,
    RoundInfo,
    RunInfo,
    SiteInfo,
    TokenInfo,
)
from .models import (
    ApiToken,
    AuditEvent,
    Metric,
    ModelVersion,
    Participation,
    PrivacySpend,
    Round,
    Run,
    Site,
    Task,
    utcnow,
)

RUN_STATUSES = ("running", "completed", "failed", "stopped")
ROUND_KINDS = ("train", "consolidate")
ROUND_STATUSES = ("running", "completed", "failed")
PHASES = ("train", "evaluate", "consolidate")
PARTICIPATION_STATUSES = ("ok", "failed", "refused", "rejected")
VERSION_STATUSES = ("candidate", "production", "archived", "rolled_back")

# Run ids and formats become path components of artifacts; keep them to a safe alphabet so a run
# id can never escape the artifacts folder ("../x") or clash with hidden temp files (".x").
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_PG_CONNECT_TIMEOUT_S = 10
TOKEN_PREFIX = "fedcl_"


def default_sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of a SQLite registry file, made absolute so a later ``chdir`` is harmless."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def _check(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise RegistryError(f"invalid {what} {value!r}; valid values: {', '.join(valid)}")


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise RegistryError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the run's artifacts folder)"
        )


def _check_site_id(site_id: str) -> None:
    if not isinstance(site_id, str) or not site_id or len(site_id) > 128:
        raise RegistryError(f"invalid site id {site_id!r}: expected 1-128 characters")


def _json_normalised(config: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The config as it will read back from the JSON column (tuples become lists, etc.).

    Comparing normalised forms is what makes "resume with the same config" succeed even when the
    caller built the config with tuples or int keys.
    """
    try:
        normalised = json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"config of run {run_id!r} is not JSON-serialisable: {exc}") from None
    if not isinstance(normalised, dict):
        raise RegistryError(f"config of run {run_id!r} must be a mapping, got {type(config)}")
    return normalised


def _differing_keys(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    missing = object()
    keys = set(stored) | set(given)
    return sorted(k for k in keys if stored.get(k, missing) != given.get(k, missing))


def _error_reason(exc: BaseException, password: str | None) -> str:
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


def _write_atomic(path: Path, data: bytes) -> None:
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


def _hash_token(token: str) -> str:
    # Plain SHA-256 is enough: tokens are 256-bit random, so there is nothing to brute-force and a
    # slow KDF would only slow down every dashboard request.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _run_info(run: Run) -> RunInfo:
    return RunInfo(
        id=run.id,
        name=run.name,
        scenario=run.scenario,
        config=run.config,
        status=run.status,
        reason=run.reason,
        tasks=[t.name for t in run.tasks],
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
    )


def _round_info(r: Round) -> RoundInfo:
    return RoundInfo(
        id=r.id,
        run_id=r.run_id,
        task_index=r.task_index,
        round_in_task=r.round_in_task,
        server_round=r.server_round,
        kind=r.kind,
        status=r.status,
        started_at=r.started_at,
        finished_at=r.finished_at,
        seconds=r.seconds,
        bytes_up=r.bytes_up,
        bytes_down=r.bytes_down,
        num_participants=r.num_participants,
        num_failures=r.num_failures,
        num_refusals=r.num_refusals,
    )


def _version_info(v: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        id=v.id,
        run_id=v.run_id,
        round_id=v.round_id,
        task_index=v.task_index,
        server_round=v.server_round,
        path=v.path,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        encrypted=v.encrypted,
        format=v.format,
        status=v.status,
        created_at=v.created_at,
    )


def _audit_info(a: AuditEvent) -> AuditInfo:
    return AuditInfo(
        id=a.id,
        run_id=a.run_id,
        site_id=a.site_id,
        kind=a.kind,
        message=a.message,
        actor=a.actor,
        created_at=a.created_at,
    )


def _token_info(t: ApiToken) -> TokenInfo:
    return TokenInfo(
        id=t.id, name=t.name, role=t.role, created_at=t.created_at, revoked_at=t.revoked_at
    )


@dataclass
class _AfterCommit:
    """Files to delete once the transaction that stopped referencing them has committed."""

    unlink: list[Path] = field(default_factory=list)


class Registry:
    """Coordinator registry: runs, rounds, sites, metrics, model versions, privacy, audit, tokens.

    Open with :meth:`open` (which migrates the schema) and close when done, or use it as a
    context manager. ``url`` is the password-masked URL, safe to log and show in the dashboard.
    """

    def __init__(self, engine: Engine, *, url: str, artifacts_dir: Path) -> None:
        """Use :meth:`open`; this only wires an already-migrated engine."""
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._closed = False
        self.url = url
        self.artifacts_dir = artifacts_dir

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, url: str, *, artifacts_dir: str | os.PathLike[str] | None = None) -> Registry:
        """Connect to ``url``, upgrade the schema to head and return the registry.

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
            reason = _error_reason(exc, parsed.password)
            raise RegistryError(f"cannot open registry at {shown}: {reason}") from None
        if artifacts_dir is not None:
            artifacts = Path(artifacts_dir).expanduser().resolve()
        elif db_file is not None:
            artifacts = db_file.parent / "artifacts"
        else:
            artifacts = Path("fedcl-artifacts").resolve()
        return cls(engine, url=shown, artifacts_dir=artifacts)

    def close(self) -> None:
        """Release all database connections; further calls raise :class:`RegistryError`."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r}, artifacts_dir={str(self.artifacts_dir)!r})"

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Session]:
        """One short transaction; database outages surface as :class:`RegistryError`."""
        if self._closed:
            raise RegistryError(f"registry at {self.url} is closed")
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            reason = _error_reason(exc, self._engine.url.password)
            raise RegistryError(f"registry at {self.url}: {reason}") from exc

    @staticmethod
    def _get_run(session: Session, run_id: str) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RegistryError(f"unknown run {run_id!r}")
        return run

    @staticmethod
    def _get_round(session: Session, round_id: int, run_id: str | None = None) -> Round:
        rnd = session.get(Round, round_id)
        if rnd is None:
            raise RegistryError(f"unknown round id {round_id}")
        if run_id is not None and rnd.run_id != run_id:
            raise RegistryError(
                f"round id {round_id} belongs to run {rnd.run_id!r}, not to run {run_id!r}"
            )
        return rnd

    @staticmethod
    def _touch_site(session: Session, site_id: str) -> None:
        """Create the site on first contact and bump ``last_seen`` (the coordinator is the only
        writer, so select-then-insert cannot race)."""
        _check_site_id(site_id)
        now = utcnow()
        site = session.get(Site, site_id)
        if site is None:
            session.add(Site(id=site_id, first_seen=now, last_seen=now))
            session.flush()
        else:
            site.last_seen = now

    @staticmethod
    def _add_audit(
        session: Session,
        kind: str,
        message: str,
        *,
        run_id: str | None = None,
        site_id: str | None = None,
        actor: str = "system",
    ) -> None:
        session.add(
            AuditEvent(
                kind=kind,
                message=message,
                run_id=run_id,
                site_id=site_id,
                actor=actor,
                created_at=utcnow(),
            )
        )

    # ------------------------------------------------------------------ runs

    def create_run(
        self, run_id: str, *, name: str, scenario: str, config: dict[str, Any], tasks: list[str]
    ) -> RunInfo:
        """Create a run, or return the existing one so a restarted coordinator resumes it.

        Resuming with a different config (or task list) would silently mix two experiments in
        one run's metrics, so it is refused with the differing top-level keys named.
        """
        _check_run_id(run_id)
        normalised = _json_normalised(config, run_id)
        task_names = list(tasks)
        with self._tx() as s:
            run = s.get(Run, run_id, options=[selectinload(Run.tasks)])
            if run is not None:
                problems: list[str] = []
                differing = _differing_keys(run.config, normalised)
                if differing:
                    problems.append(f"config keys differ: {', '.join(differing)}")
                stored_tasks = [t.name for t in run.tasks]
                if stored_tasks != task_names:
                    problems.append(f"tasks differ: stored {stored_tasks}, given {task_names}")
                if problems:
                    raise RegistryError(
                        f"run {run_id!r} already exists with a different configuration "
                        f"({'; '.join(problems)}); resume it with its original config or "
                        "choose a new run id"
                    )
                return _run_info(run)
            now = utcnow()
            run = Run(
                id=run_id,
                name=name,
                scenario=scenario,
                config=normalised,
                status="running",
                created_at=now,
                updated_at=now,
                tasks=[Task(index=i, name=n) for i, n in enumerate(task_names)],
            )
            s.add(run)
            self._add_audit(s, "run.created", f"run {run_id!r} ({scenario}) created", run_id=run_id)
            s.flush()
            return _run_info(run)

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run, or ``None`` if no run has that id."""
        with self._tx() as s:
            run = s.get(Run, run_id, options=[selectinload(Run.tasks)])
            return None if run is None else _run_info(run)

    def list_runs(self, *, limit: int = 100, offset: int = 0) -> list[RunInfo]:
        """Runs, newest first."""
        with self._tx() as s:
            runs = s.scalars(
                select(Run)
                .options(selectinload(Run.tasks))
                .order_by(Run.created_at.desc(), Run.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return [_run_info(r) for r in runs]

    def set_run_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Set the run's status; terminal statuses stamp ``finished_at``, ``running`` clears it."""
        _check("run status", status, RUN_STATUSES)
        with self._tx() as s:
            run = self._get_run(s, run_id)
            old = run.status
            now = utcnow()
            run.status = status
            run.reason = reason
            run.updated_at = now
            run.finished_at = None if status == "running" else now
            message = f"run {run_id!r}: {old} -> {status}"
            if reason:
                message += f" ({reason})"
            self._add_audit(s, "run.status", message, run_id=run_id)

    # ------------------------------------------------------------------ rounds

    def begin_round(
        self,
        run_id: str,
        *,
        task_index: int,
        round_in_task: int,
        server_round: int,
        kind: str = "train",
    ) -> int:
        """Start (or restart) a server round and return its round id.

        A row for the same server round that is not completed means the coordinator died during
        that round: its participations, metrics and model versions are partial, so they are
        deleted and the row reused. Privacy spend is kept, since a site's budget was really spent.
        """
        _check("round kind", kind, ROUND_KINDS)
        after = _AfterCommit()
        with self._tx() as s:
            run = self._get_run(s, run_id)
            now = utcnow()
            rnd = s.scalar(
                select(Round).where(Round.run_id == run_id, Round.server_round == server_round)
            )
            if rnd is not None:
                if rnd.status == "completed":
                    raise RegistryError(
                        f"server round {server_round} of run {run_id!r} is already completed; "
                        "resume from the round after last_completed_round()"
                    )
                after.unlink = self._clear_round(s, rnd)
                self._add_audit(
                    s,
                    "round.reset",
                    f"server round {server_round} was left {rnd.status} (coordinator restart); "
                    "its participations, metrics and model versions were discarded",
                    run_id=run_id,
                )
            else:
                rnd = Round(run_id=run_id, server_round=server_round)
                s.add(rnd)
            rnd.task_index = task_index
            rnd.round_in_task = round_in_task
            rnd.kind = kind
            rnd.status = "running"
            rnd.started_at = now
            rnd.finished_at = None
            rnd.seconds = 0.0
            rnd.bytes_up = 0
            rnd.bytes_down = 0
            rnd.num_participants = 0
            rnd.num_failures = 0
            rnd.num_refusals = 0
            run.updated_at = now
            s.flush()
            round_id = rnd.id
        self._unlink_orphans(after.unlink)
        return round_id

    def _clear_round(self, s: Session, rnd: Round) -> list[Path]:
        versions = s.scalars(select(ModelVersion).where(ModelVersion.round_id == rnd.id)).all()
        paths = [self.artifacts_dir / v.path for v in versions]
        s.execute(delete(Participation).where(Participation.round_id == rnd.id))
        s.execute(delete(Metric).where(Metric.round_id == rnd.id))
        s.execute(delete(ModelVersion).where(ModelVersion.round_id == rnd.id))
        return paths

    @staticmethod
    def _unlink_orphans(paths: list[Path]) -> None:
        # Best effort: a leftover file is harmless (the next save of that round overwrites it).
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()

    def complete_round(
        self, round_id: int, *, seconds: float, bytes_up: int, bytes_down: int
    ) -> None:
        """Mark a running round completed, deriving its counts from the recorded participations.

        Counts are distinct sites in the train/consolidate phase: ``ok`` sites are participants,
        ``failed`` and ``rejected`` (update arrived but was unusable) are failures, ``refused``
        (site declined, e.g. privacy budget exhausted) are refusals.
        """
        with self._tx() as s:
            rnd = self._get_round(s, round_id)
            if rnd.status != "running":
                raise RegistryError(
                    f"cannot complete server round {rnd.server_round} of run {rnd.run_id!r}: "
                    f"it is {rnd.status}, not running"
                )
            rows = s.execute(
                select(Participation.status, func.count(func.distinct(Participation.site_id)))
                .where(
                    Participation.round_id == round_id,
                    Participation.phase.in_(("train", "consolidate")),
                )
                .group_by(Participation.status)
            ).all()
            counts = {status: int(n) for status, n in rows}
            now = utcnow()
            rnd.status = "completed"
            rnd.finished_at = now
            rnd.seconds = float(seconds)
            rnd.bytes_up = int(bytes_up)
            rnd.bytes_down = int(bytes_down)
            rnd.num_participants = counts.get("ok", 0)
            rnd.num_failures = counts.get("failed", 0) + counts.get("rejected", 0)
            rnd.num_refusals = counts.get("refused", 0)
            self._get_run(s, rnd.run_id).updated_at = now

    def fail_round(self, round_id: int, reason: str) -> None:
        """Mark a round failed; the reason goes to the audit log (rounds have no reason column)."""
        with self._tx() as s:
            rnd = self._get_round(s, round_id)
            if rnd.status == "completed":
                raise RegistryError(
                    f"cannot fail server round {rnd.server_round} of run {rnd.run_id!r}: "
                    "it is already completed"
                )
            now = utcnow()
            rnd.status = "failed"
            rnd.finished_at = now
            rnd.seconds = (now - rnd.started_at).total_seconds()
            self._get_run(s, rnd.run_id).updated_at = now
            self._add_audit(
                s,
                "round.failed",
                f"server round {rnd.server_round} failed: {reason}",
                run_id=rnd.run_id,
            )

    def last_completed_round(self, run_id: str) -> RoundInfo | None:
        """The completed round with the highest server round: where a resumed run continues."""
        with self._tx() as s:
            rnd = s.scalar(
                select(Round)
                .where(Round.run_id == run_id, Round.status == "completed")
                .order_by(Round.server_round.desc())
                .limit(1)
            )
            return None if rnd is None else _round_info(rnd)

    def list_rounds(self, run_id: str) -> list[RoundInfo]:
        """All rounds of the run in server-round order."""
        with self._tx() as s:
            rounds = s.scalars(
                select(Round).where(Round.run_id == run_id).order_by(Round.server_round)
            ).all()
            return [_round_info(r) for r in rounds]

    # ------------------------------------------------------------------ sites & participation

    def record_participation(
        self,
        round_id: int,
        site_id: str,
        *,
        phase: str,
        status: str,
        num_examples: int = 0,
        detail: str | None = None,
    ) -> None:
        """Record (or overwrite, on retry) what a site did in one phase of a round."""
        _check("participation phase", phase, PHASES)
        _check("participation status", status, PARTICIPATION_STATUSES)
        if num_examples < 0:
            raise RegistryError(f"num_examples must be >= 0, got {num_examples}")
        with self._tx() as s:
            self._get_round(s, round_id)
            self._touch_site(s, site_id)
            row = s.scalar(
                select(Participation).where(
                    Participation.round_id == round_id,
                    Participation.site_id == site_id,
                    Participation.phase == phase,
                )
            )
            if row is None:
                row = Participation(round_id=round_id, site_id=site_id, phase=phase)
                s.add(row)
            row.status = status
            row.num_examples = int(num_examples)
            row.detail = detail
            row.created_at = utcnow()

    def list_participations(
        self, run_id: str, *, round_id: int | None = None, site_id: str | None = None
    ) -> list[ParticipationInfo]:
        """Participations of a run, optionally for one round and/or one site."""
        with self._tx() as s:
            query = (
                select(Participation, Round.server_round)
                .join(Round, Participation.round_id == Round.id)
                .where(Round.run_id == run_id)
            )
            if round_id is not None:
                query = query.where(Participation.round_id == round_id)
            if site_id is not None:
                query = query.where(Participation.site_id == site_id)
            query = query.order_by(Round.server_round, Participation.site_id, Participation.id)
            return [
                ParticipationInfo(
                    id=p.id,
                    run_id=run_id,
                    round_id=p.round_id,
                    server_round=server_round,
                    site_id=p.site_id,
                    phase=p.phase,
                    status=p.status,
                    num_examples=p.num_examples,
                    detail=p.detail,
                    created_at=p.created_at,
                )
                for p, server_round in s.execute(query).all()
            ]

    def list_sites(self) -> list[SiteInfo]:
        """Every site ever seen, by id."""
        with self._tx() as s:
            return [
                SiteInfo(id=site.id, first_seen=site.first_seen, last_seen=site.last_seen)
                for site in s.scalars(select(Site).order_by(Site.id))
            ]

    # ------------------------------------------------------------------ metrics

    def record_metrics(self, run_id: str, round_id: int | None, rows: Iterable[MetricRow]) -> None:
        """Record metrics in one transaction; NaN values are kept (stored as NULL)."""
        with self._tx() as s:
            self._get_run(s, run_id)
            if round_id is not None:
                self._get_round(s, round_id, run_id)
            now = utcnow()
            touched: set[str] = set()
            for row in rows:
                if not row.name:
                    raise RegistryError(f"metric of run {run_id!r} has an empty name")
                value = float(row.value)
                if row.site_id is not None and row.site_id not in touched:
                    self._touch_site(s, row.site_id)
                    touched.add(row.site_id)
                s.add(
                    Metric(
                        run_id=run_id,
                        round_id=round_id,
                        site_id=row.site_id,
                        task_index=row.task_index,
                        name=row.name,
                        value=None if math.isnan(value) else value,
                        created_at=now,
                    )
                )

    def list_metrics(
        self,
        run_id: str,
        *,
        name: str | None = None,
        site_id: str | None | EllipsisType = ...,
        round_id: int | None = None,
    ) -> list[MetricInfo]:
        """Metrics of a run joined with their round, in server-round order.

        ``site_id``: leave out for all rows, ``None`` for federation aggregates only, or a site id.
        """
        with self._tx() as s:
            query = (
                select(Metric, Round.server_round, Round.task_index)
                .outerjoin(Round, Metric.round_id == Round.id)
                .where(Metric.run_id == run_id)
            )
            if name is not None:
                query = query.where(Metric.name == name)
            if site_id is None:
                query = query.where(Metric.site_id.is_(None))
            elif not isinstance(site_id, EllipsisType):
                query = query.where(Metric.site_id == site_id)
            if round_id is not None:
                query = query.where(Metric.round_id == round_id)
            query = query.order_by(func.coalesce(Round.server_round, -1), Metric.id)
            return [
                MetricInfo(
                    id=m.id,
                    run_id=m.run_id,
                    round_id=m.round_id,
                    server_round=server_round,
                    round_task_index=round_task,
                    task_index=m.task_index,
                    site_id=m.site_id,
                    name=m.name,
                    value=math.nan if m.value is None else m.value,
                    created_at=m.created_at,
                )
                for m, server_round, round_task in s.execute(query).all()
            ]

    # ------------------------------------------------------------------ model versions

    def save_model_version(
        self,
        run_id: str,
        round_id: int | None,
        *,
        task_index: int,
        server_round: int,
        payload: bytes,
        encrypted: bool,
        format: str,
    ) -> ModelVersionInfo:
        """Write the model to ``<artifacts>/<run>/round-<NNNNN>.<format>`` and register it.

        The file is written (atomically) before the row is committed, so a row never points at a
        half-written file. Saving the same round again replaces the candidate; a production model
        is never overwritten in place.
        """
        _check_run_id(run_id)
        if not _FORMAT.fullmatch(format):
            raise RegistryError(f"invalid model format {format!r}: use letters, digits, '_', '-'")
        if server_round < 0:
            raise RegistryError(f"server_round must be >= 0, got {server_round}")
        rel = f"{run_id}/round-{server_round:05d}.{format}"
        target = self.artifacts_dir / rel
        digest = hashlib.sha256(payload).hexdigest()
        with self._tx() as s:
            self._get_run(s, run_id)
            if round_id is not None:
                self._get_round(s, round_id, run_id)
            version = s.scalar(select(ModelVersion).where(ModelVersion.path == rel))
            if version is not None and version.status == "production":
                raise RegistryError(
                    f"refusing to overwrite production model version {version.id} at {target}"
                )
            try:
                _write_atomic(target, payload)
            except OSError as exc:
                raise RegistryError(
                    f"cannot write model artifact {target}: {exc.strerror or exc}"
                ) from None
            if version is None:
                version = ModelVersion(run_id=run_id, path=rel)
                s.add(version)
            else:
                self._add_audit(
                    s,
                    "model_version.overwritten",
                    f"model version {version.id} at {rel} replaced "
                    f"(sha256 {version.sha256} -> {digest})",
                    run_id=run_id,
                )
            version.round_id = round_id
            version.task_index = task_index
            version.server_round = server_round
            version.sha256 = digest
            version.size_bytes = len(payload)
            version.encrypted = bool(encrypted)
            version.format = format
            version.status = "candidate"
            version.created_at = utcnow()
            s.flush()
            return _version_info(version)

    def latest_model_version(self, run_id: str) -> ModelVersionInfo | None:
        """The version with the highest server round, skipping rolled-back ones.

        A resumed run restarts from this model, and a model an operator rolled back must not be
        silently picked up again.
        """
        with self._tx() as s:
            version = s.scalar(
                select(ModelVersion)
                .where(ModelVersion.run_id == run_id, ModelVersion.status != "rolled_back")
                .order_by(ModelVersion.server_round.desc(), ModelVersion.id.desc())
                .limit(1)
            )
            return None if version is None else _version_info(version)

    def list_model_versions(self, run_id: str | None = None) -> list[ModelVersionInfo]:
        """Model versions of one run (or all runs), in server-round order."""
        with self._tx() as s:
            query = select(ModelVersion)
            if run_id is not None:
                query = query.where(ModelVersion.run_id == run_id)
            query = query.order_by(ModelVersion.run_id, ModelVersion.server_round, ModelVersion.id)
            return [_version_info(v) for v in s.scalars(query)]

    def get_model_version(self, version_id: int) -> ModelVersionInfo | None:
        """One model version by id."""
        with self._tx() as s:
            version = s.get(ModelVersion, version_id)
            return None if version is None else _version_info(version)

    def load_artifact(self, version: ModelVersionInfo | int) -> bytes:
        """Read a model's bytes, refusing to return anything whose SHA-256 does not match.

        A silently corrupted (or swapped) model file would otherwise be deployed or resumed from.
        """
        if isinstance(version, int):
            found = self.get_model_version(version)
            if found is None:
                raise RegistryError(f"unknown model version {version}")
            version = found
        path = self.artifacts_dir / version.path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RegistryError(
                f"model artifact {path} of version {version.id} (run {version.run_id!r}, server "
                f"round {version.server_round}) is missing; expected sha256 {version.sha256}"
            ) from None
        except OSError as exc:
            raise RegistryError(
                f"cannot read model artifact {path}: {exc.strerror or exc}"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != version.sha256:
            raise RegistryError(
                f"model artifact {path} of version {version.id} is corrupt: expected sha256 "
                f"{version.sha256}, file has sha256 {actual} ({len(data)} bytes)"
            )
        return data

    def set_version_status(self, version_id: int, status: str, *, actor: str) -> ModelVersionInfo:
        """Change a model version's status and audit who did it.

        Promoting to production archives the run's previous production version, so "the
        production model of a run" is always unambiguous.
        """
        _check("model version status", status, VERSION_STATUSES)
        if not actor:
            raise RegistryError("set_version_status needs a non-empty actor for the audit log")
        with self._tx() as s:
            version = s.get(ModelVersion, version_id)
            if version is None:
                raise RegistryError(f"unknown model version {version_id}")
            if version.status == status:
                return _version_info(version)
            if status == "production":
                previous = s.scalars(
                    select(ModelVersion).where(
                        ModelVersion.run_id == version.run_id,
                        ModelVersion.status == "production",
                        ModelVersion.id != version.id,
                    )
                ).all()
                for other in previous:
                    other.status = "archived"
                    self._add_audit(
                        s,
                        "model_version.status",
                        f"model version {other.id} (run {other.run_id!r}, server round "
                        f"{other.server_round}): production -> archived "
                        f"(superseded by version {version.id})",
                        run_id=other.run_id,
                        actor=actor,
                    )
            old = version.status
            version.status = status
            self._add_audit(
                s,
                "model_version.status",
                f"model version {version.id} (run {version.run_id!r}, server round "
                f"{version.server_round}): {old} -> {status}",
                run_id=version.run_id,
                actor=actor,
            )
            return _version_info(version)

    # ------------------------------------------------------------------ privacy and audit

    def record_privacy(
        self,
        run_id: str,
        round_id: int | None,
        site_id: str,
        *,
        epsilon_run: float,
        epsilon_lifetime: float,
        delta: float,
        budget: float | None,
    ) -> None:
        """Record a site's reported differential-privacy spend."""
        with self._tx() as s:
            self._get_run(s, run_id)
            if round_id is not None:
                self._get_round(s, round_id, run_id)
            self._touch_site(s, site_id)
            s.add(
                PrivacySpend(
                    run_id=run_id,
                    round_id=round_id,
                    site_id=site_id,
                    epsilon_run=float(epsilon_run),
                    epsilon_lifetime=float(epsilon_lifetime),
                    delta=float(delta),
                    budget=None if budget is None else float(budget),
                    created_at=utcnow(),
                )
            )

    def list_privacy(self, run_id: str, site_id: str | None = None) -> list[PrivacyInfo]:
        """Privacy spend records of a run (optionally one site), oldest first."""
        with self._tx() as s:
            query = (
                select(PrivacySpend, Round.server_round)
                .outerjoin(Round, PrivacySpend.round_id == Round.id)
                .where(PrivacySpend.run_id == run_id)
            )
            if site_id is not None:
                query = query.where(PrivacySpend.site_id == site_id)
            query = query.order_by(PrivacySpend.id)
            return [
                PrivacyInfo(
                    id=p.id,
                    run_id=p.run_id,
                    round_id=p.round_id,
                    server_round=server_round,
                    site_id=p.site_id,
                    epsilon_run=p.epsilon_run,
                    epsilon_lifetime=p.epsilon_lifetime,
                    delta=p.delta,
                    budget=p.budget,
                    created_at=p.created_at,
                )
                for p, server_round in s.execute(query).all()
            ]

    def audit(
        self,
        kind: str,
        message: str,
        *,
        run_id: str | None = None,
        site_id: str | None = None,
        actor: str = "system",
    ) -> None:
        """Append an audit event (ids are not checked: the log may mention unknown things)."""
        with self._tx() as s:
            self._add_audit(s, kind, message, run_id=run_id, site_id=site_id, actor=actor)

    def list_audit(self, *, run_id: str | None = None, limit: int = 200) -> list[AuditInfo]:
        """Audit events, newest first."""
        with self._tx() as s:
            query = select(AuditEvent)
            if run_id is not None:
                query = query.where(AuditEvent.run_id == run_id)
            query = query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(limit)
            return [_audit_info(a) for a in s.scalars(query)]

    # ------------------------------------------------------------------ tokens

    def create_token(self, name: str, role: str) -> str:
        """Create an API token and return its plaintext, the only time it is ever available."""
        if not name or not role:
            raise RegistryError("an API token needs a non-empty name and role")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as s:
            row = ApiToken(name=name, role=role, token_hash=_hash_token(token), created_at=utcnow())
            s.add(row)
            self._add_audit(s, "token.created", f"API token {name!r} created with role {role!r}")
        return token

    def verify_token(self, token: str) -> TokenInfo | None:
        """The token's metadata if it exists and is not revoked, else ``None``."""
        if not token:
            return None
        with self._tx() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash_token(token)))
            if row is None or row.revoked_at is not None:
                return None
            return _token_info(row)

    def revoke_token(self, token_id: int, *, actor: str) -> TokenInfo:
        """Revoke a token by id (idempotent) and audit who did it."""
        with self._tx() as s:
            row = s.get(ApiToken, token_id)
            if row is None:
                raise RegistryError(f"unknown API token id {token_id}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                self._add_audit(s, "token.revoked", f"API token {row.name!r} revoked", actor=actor)
            return _token_info(row)
