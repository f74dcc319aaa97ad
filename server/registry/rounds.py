"""Server rounds: begun, completed or failed, and restarted cleanly after a coordinator crash."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from fedcl.config.vocabulary import Phase, RoundKind, RoundStatus, SiteStatus

from .artifacts import unlink_quietly
from .audit import add_audit
from .core import RegistryCore, get_round, get_run
from .errors import RegistryError
from .info import RoundInfo
from .models import Metric, ModelVersion, Participation, Round, utcnow
from .validation import ROUND_KINDS, check_value

# The phases whose participations a round's counts are derived from.
COUNTED_PHASES = (Phase.TRAIN, Phase.CONSOLIDATE)


class Rounds(RegistryCore):
    """The life of a server round and the queries a resumed run starts from."""

    def begin_round(
        self,
        run_id: str,
        *,
        task_index: int,
        round_in_task: int,
        server_round: int,
        kind: str = RoundKind.TRAIN,
    ) -> int:
        """Start (or restart) a server round and return its round id.

        A row for the same server round that is not completed means the coordinator died during
        that round: its participations, metrics and model versions are partial, so they are
        deleted and the row reused. Privacy spend is kept, since a site's budget was really spent.
        """
        check_value("round kind", kind, ROUND_KINDS)
        orphans: list[Path] = []
        with self._tx() as s:
            run = get_run(s, run_id)
            now = utcnow()
            rnd = s.scalar(
                select(Round).where(Round.run_id == run_id, Round.server_round == server_round)
            )
            if rnd is not None:
                if rnd.status == RoundStatus.COMPLETED:
                    raise RegistryError(
                        f"server round {server_round} of run {run_id!r} is already completed; "
                        "resume from the round after last_completed_round()"
                    )
                orphans = self._clear_round(s, rnd)
                add_audit(
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
            rnd.status = RoundStatus.RUNNING
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
        # Only once the deletions committed: a rolled-back reset must keep its files.
        unlink_quietly(orphans)
        return round_id

    def _clear_round(self, s: Session, rnd: Round) -> list[Path]:
        """Delete a crashed round's rows; return its artifact files to unlink after commit."""
        versions = s.scalars(select(ModelVersion).where(ModelVersion.round_id == rnd.id)).all()
        paths = [self.artifacts_dir / v.path for v in versions]
        s.execute(delete(Participation).where(Participation.round_id == rnd.id))
        s.execute(delete(Metric).where(Metric.round_id == rnd.id))
        s.execute(delete(ModelVersion).where(ModelVersion.round_id == rnd.id))
        return paths

    def complete_round(
        self, round_id: int, *, seconds: float, bytes_up: int, bytes_down: int
    ) -> None:
        """Mark a running round completed, deriving its counts from the recorded participations.

        Counts are distinct sites in the train/consolidate phase: ``ok`` sites are participants,
        ``failed`` and ``rejected`` (update arrived but was unusable) are failures, ``refused``
        (site declined, e.g. privacy budget exhausted) are refusals.
        """
        with self._tx() as s:
            rnd = get_round(s, round_id)
            if rnd.status != RoundStatus.RUNNING:
                raise RegistryError(
                    f"cannot complete server round {rnd.server_round} of run {rnd.run_id!r}: "
                    f"it is {rnd.status}, not running"
                )
            # Counted first: its query flushes what is pending, and the round's new values
            # then go out as one UPDATE at the commit rather than one before it and one after.
            _count(s, rnd)
            now = utcnow()
            rnd.status = RoundStatus.COMPLETED
            rnd.finished_at = now
            rnd.seconds = float(seconds)
            rnd.bytes_up = int(bytes_up)
            rnd.bytes_down = int(bytes_down)
            get_run(s, rnd.run_id).updated_at = now

    def recount_round(self, round_id: int) -> None:
        """Derive a completed round's counts again after its participations changed.

        A culprit found after the round completed (its corrupt aggregate shows only when the
        next round's sites decrypt it) turns an ``ok`` into ``rejected``.
        """
        with self._tx() as s:
            _count(s, get_round(s, round_id))

    def fail_round(self, round_id: int, reason: str) -> None:
        """Mark a round failed; the reason goes to the audit log (rounds have no reason column)."""
        with self._tx() as s:
            rnd = get_round(s, round_id)
            if rnd.status == RoundStatus.COMPLETED:
                raise RegistryError(
                    f"cannot fail server round {rnd.server_round} of run {rnd.run_id!r}: "
                    "it is already completed"
                )
            now = utcnow()
            rnd.status = RoundStatus.FAILED
            rnd.finished_at = now
            rnd.seconds = (now - rnd.started_at).total_seconds()
            get_run(s, rnd.run_id).updated_at = now
            add_audit(
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
                .where(Round.run_id == run_id, Round.status == RoundStatus.COMPLETED)
                .order_by(Round.server_round.desc())
                .limit(1)
            )
            return None if rnd is None else RoundInfo.model_validate(rnd)

    def list_rounds(self, run_id: str) -> list[RoundInfo]:
        """All rounds of the run in server-round order."""
        with self._tx() as s:
            rounds = s.scalars(
                select(Round).where(Round.run_id == run_id).order_by(Round.server_round)
            ).all()
            return [RoundInfo.model_validate(r) for r in rounds]


def _count(s: Session, rnd: Round) -> None:
    """A round's counts from its train/consolidate participations (distinct sites)."""
    rows = s.execute(
        select(Participation.status, func.count(func.distinct(Participation.site_id)))
        .where(Participation.round_id == rnd.id, Participation.phase.in_(COUNTED_PHASES))
        .group_by(Participation.status)
    ).all()
    counts = {status: int(n) for status, n in rows}
    rnd.num_participants = counts.get(SiteStatus.OK, 0)
    rnd.num_failures = counts.get(SiteStatus.FAILED, 0) + counts.get(SiteStatus.REJECTED, 0)
    rnd.num_refusals = counts.get(SiteStatus.REFUSED, 0)
