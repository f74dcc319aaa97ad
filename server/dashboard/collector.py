"""Prometheus metrics computed from the registry at scrape time.

A custom collector rather than counters updated in-process: the dashboard is a separate process
from the coordinator (docs/DESIGN.md §2): the registry is the only place that knows how many rounds
ran. Every scrape reads it afresh; values are therefore exactly what the registry says, survive
dashboard restarts, and several dashboards over one registry agree.

Runs are labelled by run id. To bound label cardinality only running runs plus the
``recent_runs`` most recently created ones are exported.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fedcl.config.vocabulary import RoundStatus, RunStatus
from fedcl.server.registry import PrivacyInfo, Registry, RegistryError

from .floats import finite
from .service import all_runs, results_of
from .service.alerts import run_alerts

log = logging.getLogger(__name__)

# Round durations range from seconds (simulations) to many minutes (real sites, HE).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class RegistryCollector(Collector):
    """Yields the federation's round, participation, traffic and privacy figures per run."""

    def __init__(self, registry: Registry, *, recent_runs: int = 20) -> None:
        self.registry = registry
        self.recent_runs = recent_runs

    def describe(self) -> list[Metric]:
        # Describing would need a registry read at registration time; nothing to check against.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("fedcl_registry_up", "1 if the registry could be read")
        try:
            families = self._families()
        except RegistryError as exc:
            log.warning("prometheus scrape: %s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from families

    def _families(self) -> list[Metric]:
        reg = self.registry
        runs = all_runs(reg)
        shown = [r for r in runs if r.status == RunStatus.RUNNING]
        shown += [r for r in runs[: self.recent_runs] if r.status != RunStatus.RUNNING]

        by_status: dict[str, int] = defaultdict(int)
        for run in runs:
            by_status[run.status] += 1
        runs_total = GaugeMetricFamily("fedcl_runs", "Runs in the registry", labels=["status"])
        for status_, n in sorted(by_status.items()):
            runs_total.add_metric([status_], n)

        run_info = GaugeMetricFamily(
            "fedcl_run_info", "1 per exported run", labels=["run", "scenario", "status"]
        )
        completed = CounterMetricFamily(
            "fedcl_rounds_completed", "Completed server rounds", labels=["run"]
        )
        failed = CounterMetricFamily("fedcl_rounds_failed", "Failed server rounds", labels=["run"])
        duration = HistogramMetricFamily(
            "fedcl_round_duration_seconds", "Duration of completed rounds", labels=["run"]
        )
        last_duration = GaugeMetricFamily(
            "fedcl_round_last_duration_seconds",
            "Duration of the last completed round",
            labels=["run"],
        )
        last_finished = GaugeMetricFamily(
            "fedcl_round_last_finished_timestamp_seconds",
            "When the last completed round finished (alert on staleness)",
            labels=["run"],
        )
        participants = GaugeMetricFamily(
            "fedcl_round_participants",
            "Sites that trained in the last completed round",
            labels=["run"],
        )
        failures = CounterMetricFamily(
            "fedcl_site_failures",
            "Failed or rejected site replies, summed over rounds",
            labels=["run"],
        )
        refusals = CounterMetricFamily(
            "fedcl_site_refusals",
            "Site refusals (e.g. privacy budget), summed over rounds",
            labels=["run"],
        )
        bytes_in = CounterMetricFamily(
            "fedcl_bytes_received", "Bytes the sites sent to the coordinator", labels=["run"]
        )
        bytes_out = CounterMetricFamily(
            "fedcl_bytes_sent", "Bytes the coordinator sent to the sites", labels=["run"]
        )
        epsilon = GaugeMetricFamily(
            "fedcl_site_epsilon", "Latest ε a site reported for the run", labels=["run", "site"]
        )
        epsilon_lifetime = GaugeMetricFamily(
            "fedcl_site_epsilon_lifetime", "Latest lifetime ε a site reported", labels=["site"]
        )
        budget = GaugeMetricFamily(
            "fedcl_site_epsilon_budget", "ε budget a site reported", labels=["site"]
        )
        versions = GaugeMetricFamily(
            "fedcl_model_versions", "Model versions by status", labels=["run", "status"]
        )
        drift_score = GaugeMetricFamily(
            "fedcl_site_drift_score",
            "Latest drift score a site released for the run (it alerts above 1)",
            labels=["run", "site"],
        )
        drift_alert = GaugeMetricFamily(
            "fedcl_site_drift_alert",
            "1 if a site's latest drift report alerted (distribution or class rate)",
            labels=["run", "site"],
        )
        alert = GaugeMetricFamily(
            "fedcl_run_alert",
            "1 per alert the run page shows (kind: accuracy_drop, budget, site_failing)",
            labels=["run", "kind", "site", "severity"],
        )
        drift_alerts = CounterMetricFamily(
            "fedcl_drift_alerts", "Drift reports that alerted, summed over rounds", labels=["run"]
        )

        latest_report: dict[str, PrivacyInfo] = {}
        for run in shown:
            labels = [run.id]
            run_info.add_metric([run.id, run.scenario, run.status], 1.0)
            rounds = reg.list_rounds(run.id)
            done = [r for r in rounds if r.status == RoundStatus.COMPLETED]
            completed.add_metric(labels, len(done))
            failed.add_metric(labels, sum(r.status == RoundStatus.FAILED for r in rounds))
            seconds = [s for s in (finite(r.seconds) for r in done) if s is not None]
            buckets = [
                (str(edge), sum(s <= edge for s in seconds)) for edge in DURATION_BUCKETS
            ] + [("+Inf", len(seconds))]
            duration.add_metric(labels, buckets, sum(seconds))
            if done:
                last = done[-1]
                last_duration.add_metric(labels, finite(last.seconds) or 0.0)
                participants.add_metric(labels, last.num_participants)
                if last.finished_at is not None:
                    last_finished.add_metric(labels, last.finished_at.timestamp())
            failures.add_metric(labels, sum(r.num_failures for r in rounds))
            refusals.add_metric(labels, sum(r.num_refusals for r in rounds))
            bytes_in.add_metric(labels, sum(r.bytes_up for r in rounds))
            bytes_out.add_metric(labels, sum(r.bytes_down for r in rounds))
            latest_run_eps: dict[str, float | None] = {}
            for p in reg.list_privacy(run.id):
                latest_run_eps[p.site_id] = finite(p.epsilon_run)
                seen = latest_report.get(p.site_id)
                if seen is None or (seen.created_at, seen.id) <= (p.created_at, p.id):
                    latest_report[p.site_id] = p
            for site, eps in sorted(latest_run_eps.items()):
                if eps is not None:
                    epsilon.add_metric([run.id, site], eps)
            counts: dict[str, int] = defaultdict(int)
            for v in reg.list_model_versions(run.id):
                counts[v.status] += 1
            for status_, n in sorted(counts.items()):
                versions.add_metric([run.id, status_], n)
            latest_drift = {}
            alerted = 0
            for e in reg.list_drift(run.id):  # by round: the last one per site wins
                latest_drift[e.site_id] = e
                alerted += e.alert or e.rate_alert
            for site, e in sorted(latest_drift.items()):
                if finite(e.score) is not None:
                    drift_score.add_metric([run.id, site], float(e.score))
                drift_alert.add_metric([run.id, site], float(e.alert or e.rate_alert))
            if latest_drift:
                drift_alerts.add_metric(labels, alerted)
            for a in run_alerts(results_of(reg, run.id)):  # the run page's alerts, one rule each
                alert.add_metric([run.id, a.kind, a.site_id or "", a.severity], 1.0)
        for site, report in sorted(latest_report.items()):
            lifetime, site_budget = finite(report.epsilon_lifetime), finite(report.budget)
            if lifetime is not None:
                epsilon_lifetime.add_metric([site], lifetime)
            if site_budget is not None:
                budget.add_metric([site], site_budget)
        return [
            runs_total,
            run_info,
            completed,
            failed,
            duration,
            last_duration,
            last_finished,
            participants,
            failures,
            refusals,
            bytes_in,
            bytes_out,
            epsilon,
            epsilon_lifetime,
            budget,
            versions,
            drift_score,
            drift_alert,
            drift_alerts,
            alert,
        ]
