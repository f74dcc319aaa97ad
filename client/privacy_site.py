"""The site's half of differential privacy: plan σ, pay from the ledger, or refuse.

Every release a site makes under DP (DP-SGD training, the DP Fisher for EWC) is charged to its
privacy ledger *before* it happens (``try_spend``), against the budget in the site's own
``site.toml``; the coordinator cannot raise it. ε is composed over the site's whole history with
Opacus' RDP accountant, across rounds, tasks and runs.
"""

from __future__ import annotations

from functools import cached_property

from fedcl.config import protocol as P
from fedcl.privacy.dp import DPHook, plan_noise, planned_release, sampling_plan
from fedcl.privacy.ledger import DPRelease, PrivacyLedger, SpendDecision

from .job import SiteJob


class SitePrivacy:
    """DP-SGD settings and accounting for one message at one site."""

    def __init__(self, job: SiteJob):
        self.job = job
        self.spec = job.experiment.dp
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
        train = self.job.experiment.train
        rounds = train.rounds_per_task
        if self.job.experiment.is_joint:  # one task, as many rounds as the whole sequence
            rounds *= len(self.job.data.stream.evaluation_tasks)
        steps, rate = 0, 0.0
        for k in range(self.job.data.stream.num_tasks):
            n = len(self.job.data.train_set(k))
            if n == 0:
                continue
            plan = sampling_plan(n, train.batch_size)
            steps += rounds * train.local_epochs * plan.batches_per_epoch
            rate = max(rate, plan.sample_rate)
        fisher = self.planned_fisher_releases()
        if not fisher:
            return plan_noise(
                epsilon=self.spec.epsilon, delta=self.delta, sample_rate=rate, steps=steps
            )
        return self._plan_with_fisher(rate, steps, fisher)

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
        self, rate: float, steps: int, fisher: list[tuple[float, float, int]]
    ) -> float:
        """σ of DP-SGD so that DP-SGD *and* the Fisher releases together meet ``dp.epsilon``.

        Opacus' ``get_noise_multiplier`` plans one homogeneous mechanism; with the Fisher
        releases in the history we search σ the same way (bisection) over Opacus' accountant.
        """
        from fedcl.privacy.dp import DPConfigError
        from fedcl.privacy.ledger import compose_epsilon

        target = float(self.spec.epsilon)

        def eps(sigma: float) -> float:
            return compose_epsilon([(sigma, rate, steps), *fisher], self.delta, "rdp")

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
                raise DPConfigError(f"dp.epsilon = {target} cannot be met with {steps} steps")
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (mid, high) if eps(mid) > target else (low, mid)
        return high

    def training_release(self, n_examples: int) -> DPRelease:
        train = self.job.experiment.train
        return planned_release(
            n_examples, train.batch_size, train.local_epochs, self.noise_multiplier, self.delta
        )

    def hook(self) -> DPHook:
        return DPHook(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.spec.max_grad_norm,
            delta=self.delta,
        )

    def charge(self, release: DPRelease) -> SpendDecision:
        """Record ``release`` if the budget allows it (atomically), else refuse."""
        return self.ledger.try_spend(
            release,
            budget=self.budget,
            run_id=self.job.run_id,
            task_index=self.job.task_index,
            server_round=self.job.server_round,
        )

    def refusal(self, decision: SpendDecision) -> str:
        return (
            f"privacy budget: ε would reach {decision.epsilon_after:.3f} > budget "
            f"{decision.budget} at δ={self.delta} (spent so far: {decision.epsilon_before:.3f})"
        )

    def metrics(self) -> dict[str, float]:
        """ε spent so far, this run and over the site's lifetime (what the registry records)."""
        out = {
            P.DP_EPSILON_RUN: self.ledger.epsilon(self.delta, run_id=self.job.run_id),
            P.DP_EPSILON_LIFETIME: self.ledger.epsilon(self.delta),
            P.DP_DELTA: self.delta,
        }
        if self.budget is not None:
            out[P.DP_BUDGET] = self.budget
        return out
