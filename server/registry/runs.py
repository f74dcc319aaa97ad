"""Runs: created once, resumed by id, and moved through their statuses with an audit trail."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from fedcl.config.vocabulary import RunStatus

from .audit import add_audit
from .core import RegistryCore, get_run
from .errors import RegistryError
from .info import RunFingerprint, RunInfo
from .models import (
    AuditEvent,
    DriftEvent,
    Metric,
    ModelVersion,
    Participation,
    PrivacySpend,
    Round,
    Run,
    Task,
    TaskStart,
    utcnow,
)
from .validation import RUN_STATUSES, check_run_id, check_value, differing_keys, json_normalised


class Runs(RegistryCore):
    """Creating, resuming, listing runs and changing their status."""

    def create_run(
        self, run_id: str, *, name: str, scenario: str, config: dict[str, Any], tasks: list[str]
    ) -> RunInfo:
        """Create a run, or return the existing one so a restarted coordinator resumes it.

        Resuming with a different config (or task list) would silently mix two experiments in
        one run's metrics, so it is refused with the differing top-level keys named.
        """
        check_run_id(run_id)
        normalised = json_normalised(config, run_id)
        task_names = list(tasks)
        with self._tx() as s:
            run = s.get(Run, run_id, options=[selectinload(Run.tasks)])
            if run is not None:
                problems: list[str] = []
                differing = differing_keys(run.config, normalised)
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
                return RunInfo.model_validate(run)
            now = utcnow()
            run = Run(
                id=run_id,
                name=name,
                scenario=scenario,
                config=normalised,
                status=RunStatus.RUNNING,
                created_at=now,
                updated_at=now,
                tasks=[Task(index=i, name=n) for i, n in enumerate(task_names)],
            )
            s.add(run)
            add_audit(s, "run.created", f"run {run_id!r} ({scenario}) created", run_id=run_id)
            s.flush()
            return RunInfo.model_validate(run)

    def get_run(self, run_id: str) -> RunInfo | None:
        """The run, or ``None`` if no run has that id."""
        with self._tx() as s:
            run = s.get(Run, run_id, options=[selectinload(Run.tasks)])
            return None if run is None else RunInfo.model_validate(run)

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
            return [RunInfo.model_validate(r) for r in runs]

    def set_run_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        """Set the run's status; terminal statuses stamp ``finished_at``, ``running`` clears it."""
        check_value("run status", status, RUN_STATUSES)
        with self._tx() as s:
            run = get_run(s, run_id)
            old = run.status
            now = utcnow()
            run.status = status
            run.reason = reason
            run.updated_at = now
            run.finished_at = None if status == RunStatus.RUNNING else now
            message = f"run {run_id!r}: {old} -> {status}"
            if reason:
                message += f" ({reason})"
            add_audit(s, "run.status", message, run_id=run_id)

    def run_fingerprint(self, run_id: str) -> RunFingerprint:
        """A value that changes whenever anything recorded about the run changes.

        One query of counts and newest ids (every table a run's pages read), so a reader can
        cache what it built from the run and rebuild only after a round wrote something: the
        dashboard's run page and its poll (a 200-round, 30-site run has ~30,000 metric rows).
        Rows only ever change with a round's completion, a status change or an audit event, so
        the run's ``updated_at`` and newest audit id cover overwrites in place.
        """

        def scalars(model: Any, where: Any) -> list[Any]:
            return [
                select(func.count()).select_from(model).where(where).scalar_subquery(),
                select(func.max(model.id)).where(where).scalar_subquery(),
            ]

        rounds = select(Round.id).where(Round.run_id == run_id)
        columns = [
            select(Run.status).where(Run.id == run_id).scalar_subquery(),
            select(Run.updated_at).where(Run.id == run_id).scalar_subquery(),
            select(Run.reason).where(Run.id == run_id).scalar_subquery(),
            select(func.max(AuditEvent.id)).where(AuditEvent.run_id == run_id).scalar_subquery(),
            *scalars(Participation, Participation.round_id.in_(rounds)),
        ]
        for model in (Round, Metric, PrivacySpend, DriftEvent, TaskStart, ModelVersion):
            columns += scalars(model, model.run_id == run_id)
        with self._tx() as s:  # one statement: it runs on every dashboard request about a run
            return RunFingerprint(*s.execute(select(*columns)).one())
