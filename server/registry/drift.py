"""Drift as the sites report it, and when and why each task of a run began (docs/DESIGN.md §12).

A drift event is what one site released about one round: two scores and their alert bits
(``fedcl.continual.drift``); the coordinator cannot check them, it records them. A task start
says whether the task began on schedule or was opened by drift, naming the sites and scores.
"""

from __future__ import annotations

import math

from sqlalchemy import select

from .core import RegistryCore, get_round, get_run, touch_site
from .errors import RegistryError
from .info import DriftInfo, TaskStartInfo
from .models import DriftEvent, Round, TaskStart, utcnow
from .validation import PARTICIPATION_STATUSES, check_value

#: Why a task began.
TASK_TRIGGERS = ("scheduled", "drift", "rate")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


class DriftRecords(RegistryCore):
    """Recording and reading drift reports and task starts."""

    def record_drift(
        self,
        run_id: str,
        round_id: int,
        site_id: str,
        *,
        status: str = "ok",
        score: float | None = None,
        alert: bool = False,
        rate_shift: float | None = None,
        rate_alert: bool = False,
    ) -> None:
        """Record what a site reported about drift in a round."""
        check_value("drift report status", status, PARTICIPATION_STATUSES)
        with self._tx() as s:
            get_run(s, run_id)
            get_round(s, round_id, run_id)
            touch_site(s, site_id)
            s.add(
                DriftEvent(
                    run_id=run_id,
                    round_id=round_id,
                    site_id=site_id,
                    status=status,
                    score=_finite(score),
                    alert=bool(alert),
                    rate_shift=_finite(rate_shift),
                    rate_alert=bool(rate_alert),
                    created_at=utcnow(),
                )
            )

    def list_drift(self, run_id: str, site_id: str | None = None) -> list[DriftInfo]:
        """A run's drift reports (optionally one site's), by round then site."""
        with self._tx() as s:
            query = (
                select(*DriftEvent.__table__.c, Round.server_round, Round.task_index)
                .join(Round, DriftEvent.round_id == Round.id)
                .where(DriftEvent.run_id == run_id)
            )
            if site_id is not None:
                query = query.where(DriftEvent.site_id == site_id)
            query = query.order_by(Round.server_round, DriftEvent.site_id, DriftEvent.id)
            return [DriftInfo.model_validate(row) for row in s.execute(query)]

    def record_task_start(
        self, run_id: str, task_index: int, *, server_round: int, trigger: str, reason: str
    ) -> None:
        """Say when a task began and why (once per task: a resumed run keeps the first)."""
        check_value("task trigger", trigger, TASK_TRIGGERS)
        with self._tx() as s:
            get_run(s, run_id)
            if task_index < 0:
                raise RegistryError(f"invalid task index {task_index}")
            seen = s.scalar(
                select(TaskStart).where(
                    TaskStart.run_id == run_id, TaskStart.task_index == task_index
                )
            )
            if seen is not None:
                return
            s.add(
                TaskStart(
                    run_id=run_id,
                    task_index=task_index,
                    server_round=server_round,
                    trigger=trigger,
                    reason=reason,
                    created_at=utcnow(),
                )
            )

    def list_task_starts(self, run_id: str) -> list[TaskStartInfo]:
        """When and why each task of a run began, in task order."""
        with self._tx() as s:
            rows = s.scalars(
                select(TaskStart).where(TaskStart.run_id == run_id).order_by(TaskStart.task_index)
            )
            return [TaskStartInfo.model_validate(r) for r in rows]
