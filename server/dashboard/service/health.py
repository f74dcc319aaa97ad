"""What a run's badge says: its status, unless that status would mislead.

A run the registry calls ``running`` whose coordinator died never records anything again, so a
running run with nothing recorded for longer than its rounds allow is ``stale``. The coordinator
writes at every round's start and end, so the allowance is a few round timeouts
(``train.round_timeout_s``; :data:`STALE_AFTER_S` without one, or at the least). A run that
completed while sites failed or refused is ``degraded``, never a plain (green) ``completed``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fedcl.config.vocabulary import RunStatus
from fedcl.server.registry import RunInfo

STALE_AFTER_S = 900.0  # 15 minutes without a round starting or ending
STALE = "stale"
DEGRADED = "degraded"


def stale_after_s(config: dict[str, Any]) -> float:
    """Seconds of silence after which a running run is taken for dead."""
    train = config.get("train") or {}
    timeout = train.get("round_timeout_s")
    wait = train.get("site_wait_s") or 0.0
    if not timeout:
        return STALE_AFTER_S
    return max(STALE_AFTER_S, 3.0 * float(timeout) + float(wait))


def idle_seconds(run: RunInfo, now: datetime | None = None) -> float:
    now = now or datetime.now(UTC)
    updated = run.updated_at if run.updated_at.tzinfo else run.updated_at.replace(tzinfo=UTC)
    return max(0.0, (now - updated).total_seconds())


def run_health(run: RunInfo, lost_site_rounds: int, now: datetime | None = None) -> str:
    if run.status == RunStatus.RUNNING and idle_seconds(run, now) > stale_after_s(run.config):
        return STALE
    if run.status == RunStatus.COMPLETED and lost_site_rounds:
        return DEGRADED
    return run.status
