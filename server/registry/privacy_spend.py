"""Differential-privacy spend as the sites report it, never refunded.

The coordinator cannot verify these numbers (each site runs its own accountant); the registry
keeps every report, so the dashboard can show what each site said it spent and when.
"""

from __future__ import annotations

from sqlalchemy import select

from .core import RegistryCore, get_round, get_run, touch_site
from .info import PrivacyInfo
from .models import PrivacySpend, Round, utcnow


class PrivacyRecords(RegistryCore):
    """Recording and reading sites' reported privacy spend."""

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
            get_run(s, run_id)
            if round_id is not None:
                get_round(s, round_id, run_id)
            touch_site(s, site_id)
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

    def list_privacy(
        self, run_id: str, site_id: str | None = None, *, round_id: int | None = None
    ) -> list[PrivacyInfo]:
        """Privacy spend records of a run (optionally one site, one round), oldest first.

        ``round_id``: as for metrics and participations, so a reader that holds a run's
        reports (the dashboard) reads only a new round's.
        """
        with self._tx() as s:
            # The report's columns plus its round's server round: the snapshot's fields.
            query = (
                select(*PrivacySpend.__table__.c, Round.server_round)
                .outerjoin(Round, PrivacySpend.round_id == Round.id)
                .where(PrivacySpend.run_id == run_id)
            )
            if site_id is not None:
                query = query.where(PrivacySpend.site_id == site_id)
            if round_id is not None:
                query = query.where(PrivacySpend.round_id == round_id)
            query = query.order_by(PrivacySpend.id)
            return [PrivacyInfo.model_validate(row) for row in s.execute(query)]
