"""Sites and what each did in each round: the rows a round's counts are derived from.

Sites are never registered up front: the coordinator creates one on first contact (any
participation, metric or privacy report naming it), so the site list is simply who was heard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import insert, select

from .core import RegistryCore, get_round, touch_site, touch_sites
from .errors import RegistryError
from .info import ParticipationInfo, SiteInfo
from .models import Participation, Round, Site, utcnow
from .validation import PARTICIPATION_STATUSES, PHASES, check_site_id, check_value


@dataclass(frozen=True)
class ParticipationRow:
    """One site's participation in one phase of a round, to record (an input)."""

    site_id: str
    phase: str
    status: str
    num_examples: int = 0
    detail: str | None = None


class Participations(RegistryCore):
    """Recording and reading participations, and the sites they introduced."""

    def record_participations(self, round_id: int, rows: Iterable[ParticipationRow]) -> None:
        """Record (or overwrite, on retry) many sites' participations of one round at once.

        One transaction, one query for the rows already there and one for the sites: a round
        of 100 sites made 100 transactions of four statements each, more than the round's own
        work on a tiny model. New rows go in as one bulk INSERT in the order given (an ORM
        object per row cost more than the statement). Same rules as
        :meth:`record_participation`.
        """
        rows = list(rows)
        for r in rows:
            check_value("participation phase", r.phase, PHASES)
            check_value("participation status", r.status, PARTICIPATION_STATUSES)
            check_site_id(r.site_id)
            if r.num_examples < 0:
                raise RegistryError(f"num_examples must be >= 0, got {r.num_examples}")
        if not rows:
            return
        with self._tx() as s:
            get_round(s, round_id)
            now = utcnow()
            names = {r.site_id for r in rows}
            touch_sites(s, names)
            there = {
                (p.site_id, p.phase): p
                for p in s.scalars(
                    select(Participation).where(
                        Participation.round_id == round_id, Participation.site_id.in_(names)
                    )
                )
            }
            new: dict[tuple[str, str], dict] = {}  # rows not there yet: one bulk INSERT
            for r in rows:
                fields = {
                    "status": r.status,
                    "num_examples": int(r.num_examples),
                    "detail": r.detail,
                    "created_at": now,
                }
                row = there.get((r.site_id, r.phase))
                if row is not None:
                    for name, value in fields.items():
                        setattr(row, name, value)
                    continue
                key = (r.site_id, r.phase)
                if key in new:  # named twice in one call: the last one wins, as for a retry
                    new[key].update(fields)
                else:
                    new[key] = {"round_id": round_id, "site_id": r.site_id, "phase": r.phase}
                    new[key].update(fields)
            if new:
                s.execute(insert(Participation.__table__), list(new.values()))  # one statement

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
        check_value("participation phase", phase, PHASES)
        check_value("participation status", status, PARTICIPATION_STATUSES)
        if num_examples < 0:
            raise RegistryError(f"num_examples must be >= 0, got {num_examples}")
        with self._tx() as s:
            get_round(s, round_id)
            touch_site(s, site_id)
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
            # Each result row carries the participation's columns plus its round's run and
            # server round: exactly the snapshot's fields.
            query = (
                select(*Participation.__table__.c, Round.run_id, Round.server_round)
                .join(Round, Participation.round_id == Round.id)
                .where(Round.run_id == run_id)
            )
            if round_id is not None:
                query = query.where(Participation.round_id == round_id)
            if site_id is not None:
                query = query.where(Participation.site_id == site_id)
            query = query.order_by(Round.server_round, Participation.site_id, Participation.id)
            return [ParticipationInfo.model_validate(row) for row in s.execute(query)]

    def list_sites(self) -> list[SiteInfo]:
        """Every site ever seen, by id."""
        with self._tx() as s:
            return [
                SiteInfo.model_validate(site) for site in s.scalars(select(Site).order_by(Site.id))
            ]
