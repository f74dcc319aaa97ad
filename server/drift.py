"""The coordinator's side of drift: record what each site reports, and open a task on drift.

After every training round, and in the monitoring rounds the run plan puts between tasks when
``drift.action = "new-task"``, the coordinator asks every site about the model it holds
(``query.drift``; the site's side is ``fedcl.client.drift_site``). Each reply carries two
scores and their alert bits; they go to the registry as the round's drift events, whatever the
action (docs/DESIGN.md §12).

With ``drift.action = "new-task"`` every task after the first is *gated*: it begins when, in
some round since the previous task began, at least ``drift.trigger.min_sites`` sites alerted, or
one site's predicted-class rate moved by more than ``drift.trigger.rate_change``. The start and
its reason (which sites, which scores, which round) are recorded in the registry
(``task_starts``) the moment the trigger fires, so a resumed coordinator knows the task is open;
the remaining monitoring rounds are skipped. A task nothing triggers is never opened: the run
ends after its monitoring rounds, with an audit event saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fedcl.config import ExperimentConfig
from fedcl.config import protocol as P
from fedcl.config.vocabulary import RoundKind
from fedcl.continual.plan import PlannedRound, RunPlan
from fedcl.strategies import SiteOutcome

from .registry import Registry

logger = logging.getLogger("fedcl.server")


class DriftWatch:
    """Drift events of one run, and the gate in front of each task after the first."""

    def __init__(
        self, experiment: ExperimentConfig, plan: RunPlan, registry: Registry, run_id: str
    ):
        self.spec = experiment.drift
        self.plan = plan
        self.registry = registry
        self.run_id = run_id
        self.gated = plan.watch_rounds > 0

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def _first_round(self, task: int) -> int:
        return min(
            s.server_round
            for s in self.plan.schedule
            if s.task_index == task and s.kind == RoundKind.TRAIN
        )

    def is_open(self, task: int) -> bool:
        """Whether ``task`` has begun or may begin (recorded in the registry)."""
        return any(t.task_index == task for t in self.registry.list_task_starts(self.run_id))

    def begin(self, step: PlannedRound) -> bool:
        """At a task's first training round: may it begin? Records a scheduled start."""
        task = step.task_index
        if self.gated and task > 0:
            if self.is_open(task):
                return True
            name = self.plan.stream.tasks[task].name
            message = (
                f"task {task} ({name}) was not opened: no drift trigger in the "
                f"{self.plan.watch_rounds} monitoring rounds before it"
            )
            logger.warning("run %s: %s", self.run_id, message)
            self.registry.audit("task.not_opened", message, run_id=self.run_id)
            return False
        self.registry.record_task_start(
            self.run_id,
            task,
            server_round=step.server_round,
            trigger="scheduled",
            reason="the run's schedule",
        )
        return True

    def waiting(self, step: PlannedRound) -> bool:
        """A monitoring round is needed: the next task is still closed."""
        return not self.is_open(step.task_index + 1)

    def record(self, round_id: int, step: PlannedRound, outcomes: Sequence[SiteOutcome]) -> None:
        """Record each site's report of this round; open the next task if it triggers."""
        alerts, moved = [], []
        for o in outcomes:
            m = o.metrics
            score = m.get(P.DRIFT_SCORE) if o.ok else None
            shift = m.get(P.DRIFT_RATE_SHIFT) if o.ok else None
            alert = bool(o.ok and m.get(P.DRIFT_ALERT, 0.0) >= 0.5)
            rate_alert = bool(o.ok and m.get(P.DRIFT_RATE_ALERT, 0.0) >= 0.5)
            self.registry.record_drift(
                self.run_id,
                round_id,
                o.site_id,
                status=o.status,
                score=score,
                alert=alert,
                rate_shift=shift,
                rate_alert=rate_alert,
            )
            if alert:
                alerts.append(f"{o.site_id} (score {float(score or 0):.2f})")
                self.registry.audit(
                    "drift.alert",
                    f"round {step.server_round}: site {o.site_id} reports drift "
                    f"(score {float(score or 0):.3g})",
                    run_id=self.run_id,
                    site_id=o.site_id,
                )
            if rate_alert:
                moved.append(f"{o.site_id} ({float(shift or 0):.3f})")
        if alerts:
            logger.warning("round %d: drift at %s", step.server_round, ", ".join(alerts))
        self._maybe_open(step, alerts, moved)

    def _maybe_open(self, step: PlannedRound, alerts: list[str], moved: list[str]) -> None:
        task = step.task_index + 1
        if not self.gated or task >= self.plan.stream.num_tasks or self.is_open(task):
            return
        trigger = self.spec.trigger
        if trigger.min_sites is not None and len(alerts) >= trigger.min_sites:
            kind = "drift"
            reason = (
                f"drift at {len(alerts)} site(s) in round {step.server_round} "
                f"(drift.trigger.min_sites = {trigger.min_sites}): {', '.join(alerts)}"
            )
        elif trigger.rate_change is not None and moved:
            kind = "rate"
            reason = (
                f"a predicted class's rate moved by more than drift.trigger.rate_change = "
                f"{trigger.rate_change:g} in round {step.server_round}: {', '.join(moved)}"
            )
        else:
            return
        first = self._first_round(task)
        self.registry.record_task_start(
            self.run_id, task, server_round=first, trigger=kind, reason=reason
        )
        self.registry.audit("task.opened", f"task {task} opened by {reason}", run_id=self.run_id)
        logger.warning("run %s: task %d opens at round %d: %s", self.run_id, task, first, reason)
