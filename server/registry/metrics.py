"""Metrics: per round (or per run), per site or federation-wide, about one task or none.

NaN is a legitimate value (a diverged loss) and is kept: SQLite stores it as NULL, and the
snapshot (``MetricInfo``) maps NULL back to NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import EllipsisType

from sqlalchemy import func, insert, select

from fedcl.config.vocabulary import Metric as MetricName

from .core import RegistryCore, get_round, get_run, touch_sites
from .errors import RegistryError
from .info import MetricInfo, MetricRow
from .models import Metric, Round, utcnow


class Metrics(RegistryCore):
    """Recording metrics and reading them back joined with their round."""

    def record_metrics(self, run_id: str, round_id: int | None, rows: Iterable[MetricRow]) -> None:
        """Record metrics in one transaction; NaN values are kept (stored as NULL).

        The rows go in as one bulk INSERT, in the order given: a round writes a row per site
        and task, and building an ORM object for each cost more than the statement.
        """
        with self._tx() as s:
            get_run(s, run_id)
            if round_id is not None:
                get_round(s, round_id, run_id)
            now = utcnow()
            rows = list(rows)
            touch_sites(s, {row.site_id for row in rows if row.site_id is not None})
            values = []
            for row in rows:
                if not row.name:
                    raise RegistryError(f"metric of run {run_id!r} has an empty name")
                value = float(row.value)
                values.append(
                    {
                        "run_id": run_id,
                        "round_id": round_id,
                        "site_id": row.site_id,
                        "task_index": row.task_index,
                        "name": row.name,
                        "value": None if math.isnan(value) else value,
                        "created_at": now,
                    }
                )
            if values:
                # Core, not ORM, bulk INSERT: the ORM leaves out None columns and groups rows by
                # the columns left, so a round's site rows and federation rows (no site, no
                # task) alternated into a dozen statements; with every column given it is one.
                s.execute(insert(Metric.__table__), values)

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
            # The metric's columns plus its round's server round and task: the snapshot's fields.
            query = (
                select(
                    *Metric.__table__.c,
                    Round.server_round,
                    Round.task_index.label("round_task_index"),
                )
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
            return [MetricInfo.model_validate(row) for row in s.execute(query)]

    def federation_accuracy_by_round(self, run_id: str) -> dict[int, dict[int, float]]:
        """server round -> task index -> federation accuracy, finite values only.

        What the canary rule compares (and the dashboard charts): the aggregate accuracy on each
        task measured in each round. Rows without a round or a task are not "by round and task";
        NaN and infinite values carry no comparison. Of duplicates, the last recorded wins.
        """
        with self._tx() as s:
            rows = s.execute(
                select(Round.server_round, Metric.task_index, Metric.value)
                .join(Round, Metric.round_id == Round.id)
                .where(
                    Metric.run_id == run_id,
                    Metric.name == MetricName.ACCURACY,
                    Metric.site_id.is_(None),
                    Metric.task_index.is_not(None),
                    Metric.value.is_not(None),
                )
                .order_by(Round.server_round, Metric.id)
            ).all()
        out: dict[int, dict[int, float]] = {}
        for server_round, task_index, value in rows:
            if math.isfinite(value):
                out.setdefault(server_round, {})[task_index] = float(value)
        return out
