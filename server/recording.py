"""What the coordinator writes down about a round: who took part, what they spent, what it scored.

Everything a round's :class:`~fedcl.strategies.Aggregate` or
:class:`~fedcl.strategies.Evaluation` says goes to the registry here, before the next round
starts: participations (including sites that never answered), rejected replies (audited by
name), the ε each site reports, the agreement of the sites' model and EWC hashes, and the
accuracy rows of the federation and of each site.
"""

from __future__ import annotations

import logging
from collections import Counter

from flwr.app import Message

from fedcl.config import protocol as P
from fedcl.config.vocabulary import Metric, Phase, RunStatus, SiteStatus, refusal_rule
from fedcl.continual.plan import PlannedRound
from fedcl.strategies import Aggregate, Evaluation, SiteDirectory, SiteOutcome

from .observers import RoundSummary
from .registry import MetricRow, Registry
from .registry.participations import ParticipationRow

logger = logging.getLogger("fedcl.server")

NO_REPLY = "no reply before the round timeout (site dropped?)"


class RunRecorder:
    """Writes one run's rounds into the registry."""

    def __init__(
        self,
        registry: Registry,
        run_id: str,
        num_eval_tasks: int,
        *,
        count_noise_sd: float | None = None,
    ) -> None:
        self.registry = registry
        self.run_id = run_id
        self.num_eval_tasks = num_eval_tasks
        #: sd of the noise on each site's evaluation counts (DP-noised evaluation), or None.
        self.count_noise_sd = count_noise_sd

    def replies(
        self,
        round_id: int,
        phase: Phase,
        result: Aggregate,
        sent: list[Message],
        sites: SiteDirectory,
        *,
        expected: str | None = None,
    ) -> None:
        """Rejections, participation, privacy and hash agreement of a train/consolidate round."""
        self.rejections(round_id, phase, result.rejections)
        self.ignored(round_id, phase, result.ignored)
        self.participation(round_id, phase, result.outcomes, sent, sites)
        self.privacy(round_id, result.outcomes)
        if phase == Phase.TRAIN:
            self.agreement(round_id, result.outcomes, expected=expected)

    def rejections(self, round_id: int, phase: Phase, rejections: list[tuple[str, str]]) -> None:
        """Replies that failed validation were dropped: audit each by name."""
        for site_id, reason in dict(rejections).items():
            logger.warning(
                "round %d: rejected %s reply of %s: %s", round_id, phase, site_id, reason
            )
            self.registry.audit(
                "update.rejected",
                f"{phase} reply of {site_id} rejected: {reason}",
                run_id=self.run_id,
                site_id=site_id,
            )

    def ignored(self, round_id: int, phase: Phase, ignored: list[tuple[str, str]]) -> None:
        """Replies set aside without changing a site's status (a duplicate): audited by name."""
        for site_id, reason in ignored:
            self.registry.audit(
                "update.duplicate",
                f"{phase} reply of {site_id} ignored: {reason}",
                run_id=self.run_id,
                site_id=site_id,
            )

    def participation(
        self,
        round_id: int,
        phase: Phase,
        outcomes: list[SiteOutcome],
        sent: list[Message] | None,
        sites: SiteDirectory,
    ) -> None:
        rows = [
            ParticipationRow(o.site_id, phase, o.status, o.num_examples, o.detail or None)
            for o in outcomes
        ]
        answered = {o.node_id for o in outcomes}
        for msg in sent or ():
            node = msg.metadata.dst_node_id
            if node not in answered:
                rows.append(
                    ParticipationRow(sites.name(node), phase, SiteStatus.FAILED, 0, NO_REPLY)
                )
        self.registry.record_participations(round_id, rows)

    def absent(self, round_id: int, kind: str, sites: list[str], *, wait_s: float) -> None:
        """Sites seen before that were not connected when the round started: failed, by name."""
        phase = Phase.CONSOLIDATE if kind == Phase.CONSOLIDATE else Phase.TRAIN
        detail = f"not connected when the round started (waited {wait_s:g} s)"
        for site in sites:
            logger.warning("round %d: site %s is not connected", round_id, site)
        rows = [ParticipationRow(site, phase, SiteStatus.FAILED, 0, detail) for site in sites]
        self.registry.record_participations(round_id, rows)

    def privacy(self, round_id: int | None, outcomes: list[SiteOutcome]) -> None:
        """ε each site reports having spent (it accounts; the coordinator only records)."""
        for o in outcomes:
            if P.DP_EPSILON_LIFETIME not in o.metrics:
                continue
            self.registry.record_privacy(
                self.run_id,
                round_id,
                o.site_id,
                epsilon_run=o.metrics.get(P.DP_EPSILON_RUN, 0.0),
                epsilon_lifetime=o.metrics[P.DP_EPSILON_LIFETIME],
                delta=o.metrics.get(P.DP_DELTA, 0.0),
                budget=o.metrics.get(P.DP_BUDGET),
            )

    def agreement(
        self, round_id: int, outcomes: list[SiteOutcome], *, expected: str | None
    ) -> None:
        """Flag sites whose global model or EWC memory differs from the rest (docs/DESIGN.md §4)."""
        for key, kind in ((P.MODEL_SHA256, "model_hash.mismatch"), (P.EWC_DIGEST, "ewc.mismatch")):
            # Every site that said what it holds, also one whose update was rejected for it.
            values = {o.site_id: o.extras[key] for o in outcomes if key in o.extras}
            if not values:
                continue
            reference = expected if key == P.MODEL_SHA256 and expected else None
            if reference is None:
                counts = Counter(values.values())
                reference = max(counts, key=lambda v: counts[v])
            odd = sorted(s for s, v in values.items() if v != reference)
            self.registry.record_metrics(
                self.run_id, round_id, [MetricRow(f"{key}-agreement", float(not odd))]
            )
            for site in odd:
                logger.warning("round %d: site %s disagrees on %s", round_id, site, key)
                self.registry.audit(
                    kind,
                    f"site {site} reports {key} {values[site][:12]}… but the federation holds "
                    f"{reference[:12]}…",
                    run_id=self.run_id,
                    site_id=site,
                )

    def accuracy_rows(self, evaluation: Evaluation, *, baseline: bool = False) -> list[MetricRow]:
        """Federation accuracy (and loss, when sent) per task, and each site's own accuracy.

        Under DP-noised evaluation the counts carry noise: an accuracy is clipped to [0, 1], a
        task whose noised count is not positive gets none, and each federation accuracy gets
        its noise's standard deviation beside it (``accuracy_noise_sd``, to first order:
        ``√S·s·√(1 + acc²) / count`` for S sites each adding noise of sd s to both counts).
        """
        acc = Metric.BASELINE_ACCURACY if baseline else Metric.ACCURACY
        loss = Metric.BASELINE_LOSS if baseline else Metric.LOSS
        noise = Metric.BASELINE_ACCURACY_NOISE_SD if baseline else Metric.ACCURACY_NOISE_SD
        totals, rows = evaluation.totals, []
        for j in range(self.num_eval_tasks):
            count_key, correct_key = P.eval_key("count", j), P.eval_key("correct", j)
            loss_key = P.eval_key("loss", j)
            count = totals.get(count_key, 0.0)
            if count > 0:
                value = min(max(totals.get(correct_key, 0.0) / count, 0.0), 1.0)
                rows.append(MetricRow(acc, value, task_index=j))
                if loss_key in totals:
                    rows.append(MetricRow(loss, totals[loss_key] / count, task_index=j))
                if self.count_noise_sd is not None:
                    sites = sum(o.ok and count_key in o.metrics for o in evaluation.outcomes)
                    sd = sites**0.5 * self.count_noise_sd * (1 + value**2) ** 0.5 / count
                    rows.append(MetricRow(noise, sd, task_index=j))
            for o in evaluation.outcomes:
                n = o.metrics.get(count_key, 0.0)
                if o.ok and n > 0:
                    value = min(max(o.metrics.get(correct_key, 0.0) / n, 0.0), 1.0)
                    rows.append(MetricRow(acc, value, site_id=o.site_id, task_index=j))
        return rows

    @staticmethod
    def summary(
        step: PlannedRound,
        seconds: float,
        result: Aggregate,
        rows: list[MetricRow],
        evaluated_round: int | None = None,
    ) -> RoundSummary:
        """The round as observers (progress bars, tests) see it; also logged.

        ``rows`` are the accuracy rows of the model of server round ``evaluated_round``.
        """
        summary = RoundSummary(
            step.task_index,
            step.round_in_task,
            step.server_round,
            seconds,
            participants=sum(o.ok for o in result.outcomes),
            failures=sum(o.status == SiteStatus.FAILED for o in result.outcomes),
            refusals=sum(o.status == SiteStatus.REFUSED for o in result.outcomes),
            accuracy={
                r.task_index: r.value
                for r in rows
                if r.site_id is None and r.name == Metric.ACCURACY and r.task_index is not None
            },
            evaluated_round=evaluated_round,
        )
        logger.info(
            "task %d round %d (server round %d): %d sites, %.2fs, accuracy %s (model of round %s)",
            step.task_index,
            step.round_in_task,
            step.server_round,
            summary.participants,
            seconds,
            {k: round(v, 3) for k, v in summary.accuracy.items()},
            evaluated_round,
        )
        return summary

    @classmethod
    def end_reason(cls, server_round: int, outcomes: list[SiteOutcome]) -> tuple[str, str]:
        """(status, reason) when a round got no usable update: all refused is a clean stop."""
        if outcomes and all(o.status == SiteStatus.REFUSED for o in outcomes):
            rules = Counter(refusal_rule(o.detail) for o in outcomes)
            named = ", ".join(f"{rule} ×{n}" for rule, n in rules.most_common())
            return RunStatus.STOPPED, (
                f"round {server_round}: every site refused ({named}): "
                + "; ".join(f"{o.site_id}: {o.detail}" for o in outcomes)
            )
        return RunStatus.FAILED, cls.no_update_reason(server_round, outcomes)

    @staticmethod
    def no_update_reason(server_round: int, outcomes: list[SiteOutcome]) -> str:
        if not outcomes:
            return f"round {server_round}: no site replied"
        parts = [f"{o.site_id} {o.status}: {o.detail}" for o in outcomes]
        return f"round {server_round}: no site returned an update (" + "; ".join(parts) + ")"
