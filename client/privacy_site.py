"""The site's half of differential privacy: its policy, plan σ, pay from the ledger, or refuse.

The site's own ``[privacy]`` policy (``fedcl.config.PrivacyPolicy``: require DP, least σ, most ε
per run, lifetime budget) is checked first (:func:`admit`, then :meth:`SitePrivacy.charge`), and
a round that falls short is refused with the rule and the numbers, before the site touches its
data and without paying anything; the coordinator cannot override it (docs/DESIGN.md §9).
Every release a site makes under DP (DP-SGD training, the DP Fisher for EWC) is charged to its
privacy ledger *before* it happens (``try_spend``), against the budget in the site's own
``site.toml``; the coordinator cannot raise it. ε is composed over the site's whole history with
Opacus' RDP accountant, across rounds, tasks and runs.

What leaves the site besides the update is only what :func:`released_metrics` and
:meth:`SitePrivacy.metrics` let through: DP sampling internals (sample rate, expected batch,
steps) and anything else that is a count stay in the site's log and ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedcl.config import ExperimentConfig, SiteConfig
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.dp import DPHook, plan_noise, planned_release, sampling_plan
from fedcl.privacy.ledger import DPRelease, PrivacyLedger, SpendDecision, compose_epsilon

from .job import SiteJob

logger = logging.getLogger("fedcl.client")

#: What the method's hooks measure that may leave the site (its summary of the round, none of
#: them a count): every other hook metric — DP-SGD's sample rate, expected batch and steps,
#: SI's path integral (a sum over the round's steps, so it grows with N / B) and whatever a new
#: hook adds — stays in the site's log (fail closed).
RELEASED_HOOK_METRICS = frozenset(
    {"ewc_penalty", "ewc_max_curvature", "lwf_distillation", "si_penalty"}
)


@dataclass(frozen=True)
class PolicyRefusal:
    """A round the site's own policy refuses: the rule (``privacy.<field>``) and why."""

    rule: str
    reason: str
    accepted: bool = False  # read like a SpendDecision's


@dataclass(frozen=True)
class SitePlan:
    """What :class:`SitePrivacy` needs to plan outside a message (``fedcl site check``)."""

    experiment: ExperimentConfig
    site: SiteConfig
    data: Any  # fedcl.client.site.SiteData
    run_id: str = "planned"
    task_index: int = 0
    server_round: int = 0

    @property
    def plan(self) -> RunPlan:
        return RunPlan.of(self.experiment)


def admit(job: SiteJob, phase: str = "train") -> tuple[SitePrivacy | None, PolicyRefusal | None]:
    """``(privacy, refusal)`` for a message, by the site's policy alone, before any data is used.

    ``privacy`` is None when DP is off and the site allows that; ``refusal`` (a
    :class:`PolicyRefusal`) is None when the policy lets the round go on. ``phase`` is
    ``train``, ``consolidate`` or ``evaluate``: a site that requires DP refuses to evaluate
    without it too (evaluation sends per-task counts and losses; evaluation under DP is issue 12,
    so with DP on it is not refused here). The most ε per run and the budget are checked when the
    round's release is charged (:meth:`SitePrivacy.charge`).
    """
    policy = job.site.privacy
    if not job.experiment.dp.enabled:
        if not policy.require_dp:
            return None, None
        why = (
            "this site sends no evaluation counts or losses without DP"
            if phase == "evaluate"
            else "this site trains and releases nothing without DP-SGD: set dp.epsilon or "
            "dp.noise_multiplier"
        )
        return SitePrivacy(job), PolicyRefusal(
            "privacy.require_dp",
            f"site policy privacy.require_dp: the experiment has DP off ({why})",
        )
    if phase == "evaluate":
        return None, None
    privacy = SitePrivacy(job)
    return privacy, privacy.noise_refusal(phase)


def released_metrics(job: SiteJob, metrics: Mapping[str, float]) -> dict[str, float]:
    """The hook metrics that may leave the site; the rest are logged here and stay."""
    out = {k: float(v) for k, v in metrics.items() if k in RELEASED_HOOK_METRICS}
    kept = {k: v for k, v in metrics.items() if k not in out}
    if kept:
        logger.info(
            "site %s round %d (kept at the site): %s",
            job.site.site_id,
            job.server_round,
            ", ".join(f"{k}={float(v):g}" for k, v in sorted(kept.items())),
        )
    return out


class SitePrivacy:
    """DP-SGD settings, the site's policy and accounting for one message at one site."""

    def __init__(self, job: SiteJob | SitePlan):
        self.job = job
        self.spec = job.experiment.dp
        self.policy = job.site.privacy
        self.delta = job.site.privacy.delta
        self.budget = job.site.privacy.epsilon_budget
        self.ledger = PrivacyLedger(job.site.state_dir)

    @cached_property
    def noise_multiplier(self) -> float:
        """σ: given, or planned so the whole run's DP-SGD meets ``dp.epsilon`` at this site.

        The plan covers every task's rounds at this site's own data sizes, at the largest sample
        rate of any task (ε grows with the sample rate, so the plan is conservative).
        """
        if self.spec.noise_multiplier is not None:
            return float(self.spec.noise_multiplier)
        training = self.planned_training()
        rate = max((q for q, _s in training), default=0.0)
        groups = self.planned_training_groups()
        steps = {g: 0 for g in groups}
        for (_q, s), g in zip(training, groups, strict=True):
            steps[g] += s
        fisher = self.planned_fisher_releases()
        if not fisher and set(steps) <= {1}:
            return plan_noise(
                epsilon=self.spec.epsilon, delta=self.delta, sample_rate=rate, steps=steps.get(1, 0)
            )
        return self._plan_with_fisher(rate, steps, fisher)

    def planned_training(self) -> list[tuple[float, int]]:
        """The run's DP-SGD at this site, ``(q, steps)`` per task, at its own data sizes."""
        train = self.job.experiment.train
        rounds = self.job.plan.rounds_per_task  # the coordinator's schedule, not a second count
        out = []
        for k in range(self.job.data.stream.num_tasks):
            n = len(self.job.data.train_set(k))
            if n == 0:
                continue
            plan = sampling_plan(n, train.batch_size)
            out.append((plan.sample_rate, rounds * train.local_epochs * plan.batches_per_epoch))
        return out

    def planned_training_groups(self) -> list[int]:
        """The DP group size of each task's DP-SGD in :meth:`planned_training` (2 with replay)."""
        from .continual_site import task_group_size

        return [
            task_group_size(self.job, k)
            for k in range(self.job.data.stream.num_tasks)
            if len(self.job.data.train_set(k))
        ]

    def planned_run_epsilon(self) -> float:
        """ε the whole run would spend at this site (DP-SGD at σ plus the Fisher releases)."""
        sigma = self.noise_multiplier
        history = [
            (sigma, q, steps, group)
            for (q, steps), group in zip(
                self.planned_training(), self.planned_training_groups(), strict=True
            )
        ]
        return compose_epsilon([*history, *self.planned_fisher_releases()], self.delta, "rdp")

    def noise_refusal(self, phase: str = "train") -> PolicyRefusal | None:
        """``privacy.min_noise_multiplier``: the σ of the release this round would make.

        Training: DP-SGD's σ (the experiment's, or planned here for ``dp.epsilon``); a
        consolidation: the DP Fisher's (``continual.fisher_noise_multiplier``).
        """
        floor = self.policy.min_noise_multiplier
        if floor is None:
            return None
        if phase == "consolidate":
            sigma = self.consolidation_release().noise_multiplier
            what, source = "DP Fisher σ", "continual.fisher_noise_multiplier"
        else:
            sigma = self.noise_multiplier
            what, source = "σ", "dp.noise_multiplier"
            if self.spec.noise_multiplier is None:
                source = f"planned at this site for dp.epsilon = {self.spec.epsilon:g}"
        if sigma >= floor:
            return None
        return PolicyRefusal(
            "privacy.min_noise_multiplier",
            f"site policy privacy.min_noise_multiplier = {float(floor)}: the experiment's {what} "
            f"would be {sigma:.3g} ({source})",
        )

    def planned_fisher_releases(self) -> list[tuple[float, float, int]]:
        """The method's releases besides training, ``(σ, q, steps)``: one per consolidated task.

        EWC's DP Fisher is one full-data Gaussian release per task but the last, as stated by
        the method's row (the same statement the site charges and the mechanism reports).
        """
        from fedcl.continual.methods import get_method

        exp = self.job.experiment
        method = get_method(exp.continual.method)
        if not method.consolidates or exp.is_joint:
            return []
        planned = []
        for k in range(self.job.data.stream.num_tasks - 1):
            release = method.consolidation_release(exp, len(self.job.data.train_set(k)))
            if release is not None:
                planned.append((release.noise_multiplier, release.sample_rate, release.steps))
        return planned

    def consolidation_release(self) -> DPRelease:
        """What this message's consolidation (the DP Fisher of the current task) spends.

        Charge this before computing the Fisher: it is the method's stated release, with which
        ``continual_site.site_fisher`` runs the mechanism and which it checks the report against.
        """
        from .continual_site import consolidation_release

        return DPRelease.of(consolidation_release(self.job), self.delta)

    def _plan_with_fisher(
        self, rate: float, steps: dict[int, int], fisher: list[tuple[float, float, int]]
    ) -> float:
        """σ of DP-SGD so that DP-SGD *and* the Fisher releases together meet ``dp.epsilon``.

        Opacus' ``get_noise_multiplier`` plans one homogeneous mechanism; with the Fisher
        releases in the history we search σ the same way (bisection) over Opacus' accountant.
        """
        from fedcl.privacy.dp import DPConfigError

        target = float(self.spec.epsilon)

        def eps(sigma: float) -> float:
            training = [(sigma, rate, n, group) for group, n in steps.items()]
            return compose_epsilon([*training, *fisher], self.delta, "rdp")

        if compose_epsilon(fisher, self.delta, "rdp") >= target:
            raise DPConfigError(
                f"site {self.job.site.site_id}: the EWC Fisher releases alone spend "
                f"ε = {compose_epsilon(fisher, self.delta, 'rdp'):.2f} ≥ dp.epsilon = {target}; "
                "raise continual.fisher_noise_multiplier"
            )
        low, high = 0.3, 1.0
        while eps(high) > target:
            low, high = high, high * 2
            if high > 1e4:
                raise DPConfigError(
                    f"dp.epsilon = {target} cannot be met with {sum(steps.values())} steps"
                )
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (mid, high) if eps(mid) > target else (low, mid)
        return high

    def training_release(self, n_examples: int) -> DPRelease:
        """This message's DP-SGD over ``n_examples``, at group size 2 over a replay buffer."""
        from dataclasses import replace

        from .continual_site import training_group_size

        train = self.job.experiment.train
        release = planned_release(
            n_examples, train.batch_size, train.local_epochs, self.noise_multiplier, self.delta
        )
        return replace(release, group_size=training_group_size(self.job))

    def hook(self) -> DPHook:
        return DPHook(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.spec.max_grad_norm,
            delta=self.delta,
        )

    def charge(self, release: DPRelease) -> SpendDecision | PolicyRefusal:
        """Record ``release`` if the policy and the budget allow it, else refuse (nothing paid).

        ``privacy.max_epsilon_per_run`` first (this run's releases at this site plus this one),
        then the lifetime budget, checked and recorded atomically by the ledger. A run's rounds
        come one at a time, so the per-run check needs no lock of its own.
        """
        cap = self.policy.max_epsilon_per_run
        if cap is not None:
            history = self.ledger.history(run_id=self.job.run_id)
            after = compose_epsilon([*history, release.history], release.delta, "rdp")
            if after > cap:
                before = compose_epsilon(history, release.delta, "rdp")
                return PolicyRefusal(
                    "privacy.max_epsilon_per_run",
                    f"site policy privacy.max_epsilon_per_run = {float(cap)}: this round would "
                    f"bring the run to ε = {after:.3g} at δ={self.delta} (spent in this run so "
                    f"far: {before:.3g})",
                )
        return self.ledger.try_spend(
            release,
            budget=self.budget,
            run_id=self.job.run_id,
            task_index=self.job.task_index,
            server_round=self.job.server_round,
        )

    def refusal(self, decision: SpendDecision | PolicyRefusal) -> str:
        if isinstance(decision, PolicyRefusal):
            return decision.reason
        return (
            f"privacy budget: ε would reach {decision.epsilon_after:.3f} > budget "
            f"{decision.budget} at δ={self.delta} (spent so far: {decision.epsilon_before:.3f})"
        )

    def metrics(self) -> dict[str, float]:
        """ε spent so far, this run and over the site's lifetime (what the registry records).

        The only privacy numbers a reply carries: no sample rate, expected batch or steps.
        """
        out = {
            P.DP_EPSILON_RUN: self.ledger.epsilon(self.delta, run_id=self.job.run_id),
            P.DP_EPSILON_LIFETIME: self.ledger.epsilon(self.delta),
            P.DP_DELTA: self.delta,
        }
        if self.budget is not None:
            out[P.DP_BUDGET] = self.budget
        return out
