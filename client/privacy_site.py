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
steps) and anything else that is a count stay in the site's log and ledger; under DP the
training loss stays too, and evaluation is noised and charged or withheld
(:mod:`fedcl.client.private_eval`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from fedcl.config import ExperimentConfig, SiteConfig
from fedcl.config import protocol as P
from fedcl.config.vocabulary import RefusalRule
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
#: Of those, what stays at the site under DP: LwF's distillation term is a mean over the
#: site's examples, not noised. The others are functions of what DP-SGD already privatised
#: (the trained weights, the noised gradients SI integrates, the federated Fisher), so they are
#: post-processing and cost nothing (docs/DESIGN.md §9).
DP_WITHHELD_HOOK_METRICS = frozenset({"lwf_distillation"})


@dataclass(frozen=True)
class PolicyRefusal:
    """A round the site's own policy refuses: the rule (``privacy.<field>``) and why."""

    rule: str
    reason: str
    accepted: bool = False  # read like a SpendDecision's


@dataclass(frozen=True)
class TaskPlan:
    """One task's DP-SGD at one site over the run (``sample_rate`` None: no plan fits)."""

    task: int
    n_examples: int
    sample_rate: float | None
    steps: int
    group_size: int
    refusal: str | None = None

    @property
    def ok(self) -> bool:
        return self.sample_rate is not None


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
    without it too, and under DP refuses ``dp.evaluation = "clear"`` (exact counts and losses,
    unaccounted); a noised evaluation's σ must meet ``privacy.min_noise_multiplier`` like any
    release. The most ε per run and the budget are checked when the round's release is charged
    (:meth:`SitePrivacy.charge`).
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
            RefusalRule.REQUIRE_DP,
            f"site policy {RefusalRule.REQUIRE_DP}: the experiment has DP off ({why})",
        )
    privacy = SitePrivacy(job)
    if phase == "evaluate" and job.experiment.dp.evaluation == "clear":
        if not policy.require_dp:
            return privacy, None
        return privacy, PolicyRefusal(
            RefusalRule.REQUIRE_DP,
            f"site policy {RefusalRule.REQUIRE_DP}: dp.evaluation = 'clear' would send exact "
            "test counts and losses, unaccounted (use 'noised' or 'withheld')",
        )
    return privacy, privacy.noise_refusal(phase)


def released_metrics(
    job: SiteJob, metrics: Mapping[str, float], *, dp: bool = False
) -> dict[str, float]:
    """The hook metrics that may leave the site (fewer under DP); the rest are logged here."""
    allowed = RELEASED_HOOK_METRICS - DP_WITHHELD_HOOK_METRICS if dp else RELEASED_HOOK_METRICS
    out = {k: float(v) for k, v in metrics.items() if k in allowed}
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
    def composition(self):
        """Whether this run is accounted in data cells here (:mod:`.privacy_cells`), and why."""
        from .privacy_cells import composition

        mode = composition(self.job)
        if self.spec.enabled:
            logger.info(
                "site %s: %s composition (%s)", self.job.site.site_id, mode.name, mode.reason
            )
        return mode

    @property
    def noise_multiplier(self) -> float:
        """σ of this message's task: given, or planned so the run's releases meet ``dp.epsilon``.

        Sequential composition: one σ for the run, planned over exactly what the run will
        release here, each task's DP-SGD at its own sample rate and steps
        (:meth:`planned_tasks`; a task the site refuses releases nothing), the method's Fisher
        releases and the noised evaluations, with Opacus' RDP accountant. Parallel composition
        (:mod:`.privacy_cells`): each task's own σ, planned over its cell alone (its DP-SGD, its
        DP Fisher, the drift reports), so each task's training data lands at ≤ ``dp.epsilon``.
        """
        return self.task_noise_multiplier(self.job.task_index)

    def task_noise_multiplier(self, task: int) -> float:
        """σ of DP-SGD at task ``task`` (:attr:`noise_multiplier` for another task)."""
        if self.spec.noise_multiplier is not None:
            return float(self.spec.noise_multiplier)
        sigmas = self._planned_sigmas
        if task in sigmas:
            return sigmas[task]
        return max(sigmas.values(), default=1.0)  # a task with no plan: σ is never used

    def smallest_noise_multiplier(self) -> float:
        """The least σ any task of the run trains at here (what ``min_noise_multiplier`` meets)."""
        if self.spec.noise_multiplier is not None:
            return float(self.spec.noise_multiplier)
        return min(self._planned_sigmas.values(), default=1.0)

    @cached_property
    def _planned_sigmas(self) -> dict[int, float]:
        """σ per task that trains here, for ``dp.epsilon`` (one value for all when sequential)."""
        epsilon = float(self.spec.epsilon)
        tasks = [t for t in self._tasks if t.ok]
        drift = tuple(self.planned_drift_releases())
        if not self.composition.parallel:
            training = tuple((t.sample_rate, t.steps, t.group_size) for t in tasks)
            fixed = (
                (FISHER, tuple(self.planned_fisher_releases())),
                (EVALUATIONS, tuple(self.planned_evaluation_releases())),
                (DRIFT, drift),
            )
            _check_fixed_releases(fixed, epsilon, self.delta)
            others = tuple(r for _name, releases in fixed for r in releases)
            sigma = _planned_sigma(epsilon, self.delta, training, others)
            return {t.task: sigma for t in tasks} or {0: sigma}
        _check_fixed_cell(self.planned_evaluation_releases(), epsilon, self.delta, "the test data")
        fisher = self._fisher_by_task()
        out = {}
        for t in tasks:
            # Every drift report counts in every task's cell: a report samples the reference
            # task's data and the task a drift event says the site sees (an upper bound).
            cell_fisher = tuple(fisher.get(t.task, ()))
            _check_fixed_releases(((FISHER, cell_fisher), (DRIFT, drift)), epsilon, self.delta)
            others = (*cell_fisher, *drift)
            training = ((t.sample_rate, t.steps, t.group_size),)
            out[t.task] = _planned_sigma(epsilon, self.delta, training, others)
        return out

    @cached_property
    def _tasks(self) -> tuple[TaskPlan, ...]:
        from fedcl.privacy.dp import NoSamplingPlan

        from .continual_site import task_group_size

        train = self.job.experiment.train
        rounds = self.job.plan.rounds_per_task  # the coordinator's schedule, not a second count
        out = []
        for k in range(self.job.data.stream.num_tasks):
            n = self.planned_examples(k)
            if n == 0:
                continue  # nothing to train on: no release (the trainer sends a zero weight)
            try:
                plan = sampling_plan(
                    n, train.batch_size, min_expected_batch=self.spec.min_expected_batch
                )
            except NoSamplingPlan as why:
                out.append(TaskPlan(k, n, None, 0, 1, str(why)))
                continue
            steps = rounds * train.local_epochs * plan.batches_per_epoch
            out.append(TaskPlan(k, n, plan.sample_rate, steps, task_group_size(self.job, k)))
        return tuple(out)

    def planned_tasks(self) -> list[TaskPlan]:
        """Each task's DP-SGD at this site over the run: its N, q, steps and group size.

        A task no sampling plan fits (:func:`fedcl.privacy.dp.sampling_plan`) carries the
        reason instead; its rounds are refused at this site and release nothing.
        """
        return list(self._tasks)

    def planned_examples(self, task: int) -> int:
        """N of task ``task``'s DP-SGD: its examples, plus the replay buffer when it replays.

        The buffer holds ``min(capacity, examples of the earlier tasks)`` (both policies fill
        it up to capacity), so the plan samples from what :func:`training_set` will hold.
        """
        from .continual_site import replays_buffer

        n = len(self.job.data.train_set(task))
        if replays_buffer(self.job, task):
            earlier = sum(len(self.job.data.train_set(k)) for k in range(task))
            n += min(self.job.experiment.continual.replay_size, earlier)
        return n

    def planned_training(self) -> list[tuple[float, int]]:
        """The run's DP-SGD at this site, ``(q, steps)`` per task it will train."""
        return [(t.sample_rate, t.steps) for t in self._tasks if t.ok]

    def planned_training_groups(self) -> list[int]:
        """The DP group size of each task's DP-SGD in :meth:`planned_training` (2 with replay)."""
        return [t.group_size for t in self._tasks if t.ok]

    def planned_run_epsilon(self) -> float:
        """ε the whole run would spend at this site (DP-SGD at σ, the Fisher, the evaluations),
        by the ledger's own rule (the max over data cells; sequential: one cell)."""
        return self.planned_run_spend().epsilon

    def planned_run_spend(self):
        """:meth:`planned_run_epsilon` and the data cell where it is reached (``CellSpend``)."""
        from fedcl.privacy.ledger import cell_spend

        from .privacy_cells import drift_cells, test_cells, train_cells

        mode, run = self.composition, self.job.run_id
        items = []
        for t in self._tasks:
            if t.ok:
                sigma = self.task_noise_multiplier(t.task)
                history = (sigma, t.sample_rate, t.steps, t.group_size)
                items.append((run, train_cells(self.job, t.task, mode), history))
        for task, releases in self._fisher_by_task().items():
            items += [(run, train_cells(self.job, task, mode), h) for h in releases]
        every = tuple(range(self.job.data.stream.num_tasks))
        drift, tested = drift_cells(self.job, every, mode), test_cells(self.job, mode)
        items += [(run, drift, h) for h in self.planned_drift_releases()]
        items += [(run, tested, h) for h in self.planned_evaluation_releases()]
        return cell_spend(items, self.delta, "rdp")

    def planned_evaluation_releases(self) -> list[tuple[float, float, int]]:
        """The noised evaluations the run will ask of this site, ``(σ, q = 1, steps = 1)`` each.

        One per evaluation that feeds the accuracy matrix (the untrained baseline and the last
        round of each task; :func:`fedcl.client.private_eval.releases_at`).
        """
        from .private_eval import planned_releases

        return planned_releases(self.job.experiment, self.job.plan)

    def planned_drift_releases(self) -> list[tuple[float, float, int]]:
        """The drift reports the run can ask of this site under DP, ``(σ, 1, 1)`` each.

        One per training round and per monitoring round (:mod:`fedcl.continual.drift`).
        """
        from fedcl.continual.drift import planned_drift_releases

        return planned_drift_releases(self.job.experiment, self.job.plan)

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
        elif phase == "evaluate":
            if self.spec.evaluation != "noised":
                return None  # withheld: nothing is released
            sigma = self.job.plan.evaluation_noise_multiplier
            what, source = "noised evaluation's σ", "dp.evaluation_noise_multiplier"
        else:
            sigma = self.noise_multiplier
            what, source = "σ", "dp.noise_multiplier"
            if self.spec.noise_multiplier is None:
                source = f"planned at this site for dp.epsilon = {self.spec.epsilon:g}"
        if sigma >= floor:
            return None
        return PolicyRefusal(
            RefusalRule.MIN_NOISE,
            f"site policy {RefusalRule.MIN_NOISE} = {float(floor)}: the experiment's {what} "
            f"would be {sigma:.3g} ({source})",
        )

    def planned_fisher_releases(self) -> list[tuple[float, float, int]]:
        """The method's releases besides training, ``(σ, q, steps)``: one per consolidated task.

        EWC's DP Fisher is one full-data Gaussian release per task but the last, as stated by
        the method's row (the same statement the site charges and the mechanism reports).
        """
        return [h for releases in self._fisher_by_task().values() for h in releases]

    def _fisher_by_task(self) -> dict[int, list[tuple[float, float, int]]]:
        from fedcl.continual.methods import get_method

        exp = self.job.experiment
        method = get_method(exp.continual.method)
        if not method.consolidates or exp.is_joint:
            return {}
        planned = {}
        for k in range(self.job.data.stream.num_tasks - 1):
            release = method.consolidation_release(exp, len(self.job.data.train_set(k)))
            if release is not None:
                planned[k] = [(release.noise_multiplier, release.sample_rate, release.steps)]
        return planned

    def placed(self, release: DPRelease, kind: str) -> DPRelease:
        """``release`` with the data cells this message's ``kind`` of release reads.

        ``kind``: ``train`` / ``consolidate`` (this task's training data), ``evaluate`` (every
        evaluation task's test data) or ``drift`` (the sampled tasks' training data). Under
        sequential composition every release is universal.
        """
        from dataclasses import replace

        from . import drift_site
        from .privacy_cells import drift_cells, test_cells, train_cells

        mode = self.composition
        if kind in ("train", "consolidate"):
            cells = train_cells(self.job, self.job.task_index, mode)
        elif kind == "evaluate":
            cells = test_cells(self.job, mode)
        elif kind == "drift":
            window = drift_site.plan_window(self.job)
            cells = drift_cells(self.job, (window.reference_task, window.window_task), mode)
        else:
            raise ValueError(f"unknown kind of release {kind!r}")
        return replace(release, cells=cells)

    def consolidation_release(self) -> DPRelease:
        """What this message's consolidation (the DP Fisher of the current task) spends.

        Charge this before computing the Fisher: it is the method's stated release, with which
        ``continual_site.site_fisher`` runs the mechanism and which it checks the report against.
        It reads the task's training data: its cell.
        """
        from .continual_site import consolidation_release

        return self.placed(DPRelease.of(consolidation_release(self.job), self.delta), "consolidate")

    def training_release(self, n_examples: int) -> DPRelease | PolicyRefusal:
        """This message's DP-SGD over ``n_examples`` (group size 2 over a replay buffer), or a
        refusal when no sampling plan fits that N (:func:`fedcl.privacy.dp.sampling_plan`)."""
        from dataclasses import replace

        from fedcl.privacy.dp import NoSamplingPlan

        from .continual_site import training_group_size

        train = self.job.experiment.train
        try:
            release = planned_release(
                n_examples,
                train.batch_size,
                train.local_epochs,
                self.noise_multiplier,
                self.delta,
                min_expected_batch=self.spec.min_expected_batch,
            )
        except NoSamplingPlan as why:
            return PolicyRefusal(
                RefusalRule.DP_PLAN,
                f"no DP-SGD plan for task {self.job.task_index} at this site "
                f"({RefusalRule.DP_PLAN}): {why}",
            )
        return self.placed(replace(release, group_size=training_group_size(self.job)), "train")

    def hook(self, *, max_physical_batch: int | None = None) -> DPHook:
        """DP-SGD at the planned σ; ``max_physical_batch`` is the site's memory bound.

        The bound counts what one pass holds: with K augmented copies of each example
        (``train.augment.multiplicity``) a pass of M examples holds M·K images, so the draw is
        split into passes of M // K examples (the split never changes the mechanism).
        """
        copies = self.job.experiment.train.augment.multiplicity
        if max_physical_batch is not None:
            max_physical_batch = max(1, max_physical_batch // copies)
        return DPHook(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.spec.max_grad_norm,
            delta=self.delta,
            max_physical_batch=max_physical_batch,
            augmult=copies,
            noise_seed=self.job.noise_seed("dp-sgd"),
        )

    def charge(self, release: DPRelease) -> SpendDecision | PolicyRefusal:
        """Record ``release`` if the policy and the budget allow it, else refuse (nothing paid).

        ``privacy.max_epsilon_per_run`` first (this run's releases at this site plus this one),
        then the lifetime budget, checked and recorded atomically by the ledger. A run's rounds
        come one at a time, so the per-run check needs no lock of its own.
        """
        cap = self.policy.max_epsilon_per_run
        if cap is not None:
            from fedcl.privacy.ledger import cell_spend, entry_items, release_item

            history = entry_items(self.ledger.entries(run_id=self.job.run_id))
            after = cell_spend(
                [*history, release_item(release, self.job.run_id)], release.delta, "rdp"
            ).epsilon
            if after > cap:
                before = cell_spend(history, release.delta, "rdp").epsilon
                return PolicyRefusal(
                    RefusalRule.MAX_EPSILON_PER_RUN,
                    f"site policy {RefusalRule.MAX_EPSILON_PER_RUN} = {float(cap)}: this round "
                    f"would bring the run to ε = {after:.3g} at δ={self.delta} (spent in this run "
                    f"so far: {before:.3g})",
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
            f"privacy budget ({RefusalRule.BUDGET}): ε would reach {decision.epsilon_after:.3f} "
            f"> budget {decision.budget} at δ={self.delta} (spent so far: "
            f"{decision.epsilon_before:.3f})"
        )

    def metrics(self) -> dict[str, float]:
        """ε spent so far, this run and over the site's lifetime (what the registry records).

        The only privacy numbers a reply carries: no sample rate, expected batch or steps.
        """
        run = self.ledger.spend(self.delta, run_id=self.job.run_id)
        out = {
            P.DP_EPSILON_RUN: run.epsilon,
            P.DP_EPSILON_LIFETIME: self.ledger.epsilon(self.delta),
            P.DP_DELTA: self.delta,
        }
        if self.budget is not None:
            out[P.DP_BUDGET] = self.budget
        logger.info(  # which cell is the worst stays here (it names a task)
            "site %s round %d: run ε = %.3f at δ=%g, reached in cell %s",
            self.job.site.site_id,
            self.job.server_round,
            run.epsilon,
            self.delta,
            run.cell,
        )
        return out


def _check_fixed_cell(
    releases: list[tuple[float, float, int]], epsilon: float, delta: float, what: str
) -> None:
    """A cell whose releases have fixed σ (the test data's noised evaluations) must fit ε."""
    from fedcl.privacy.dp import DPConfigError

    spent = compose_epsilon(releases, delta, "rdp") if releases else 0.0
    if spent > epsilon:
        raise DPConfigError(
            f"the noised evaluations alone spend ε = {spent:.2f} > dp.epsilon = {epsilon} on "
            f"{what}; raise dp.evaluation_noise_multiplier or set "
            'dp.evaluation = "withheld"'
        )


#: The releases of fixed σ a site plans besides DP-SGD, named by what the user would change.
FISHER = "EWC's DP Fisher (continual.fisher_noise_multiplier)"
EVALUATIONS = (
    'the noised evaluations (dp.evaluation_noise_multiplier, or dp.evaluation = "withheld")'
)
DRIFT = "the drift reports (drift.noise_multiplier)"


@lru_cache(maxsize=256)
def _check_fixed_releases(
    fixed: tuple[tuple[str, tuple[tuple[float, float, int], ...]], ...],
    epsilon: float,
    delta: float,
) -> None:
    """The releases of fixed σ must leave DP-SGD some ε: else name each kind's share.

    ``fixed``: (kind, its releases) pairs. Cached like :func:`_planned_sigma`: every message of
    a run plans the same releases, and one composition costs milliseconds.
    """
    from fedcl.privacy.dp import DPConfigError

    releases = [r for _name, group in fixed for r in group]
    spent = compose_epsilon(releases, delta, "rdp") if releases else 0.0
    if spent < epsilon:
        return
    shares = "; ".join(
        f"{name}: ε = {compose_epsilon(list(group), delta, 'rdp'):.2f} over {len(group)}"
        for name, group in fixed
        if group
    )
    raise DPConfigError(
        f"the releases besides DP-SGD alone spend ε = {spent:.2f} ≥ dp.epsilon = {epsilon}, "
        f"leaving training nothing ({shares}); raise the σ named, or dp.epsilon"
    )


@lru_cache(maxsize=256)
def _planned_sigma(
    epsilon: float,
    delta: float,
    training: tuple[tuple[float, int, int], ...],
    others: tuple[tuple[float, float, int], ...],
) -> float:
    """The smallest σ (to ~0.6%) at which ``training`` plus ``others`` compose to ≤ ε.

    ``training``: ``(q, steps, group size)`` per task, all at the σ sought; ``others``: releases
    of fixed σ (the DP Fisher, the noised evaluations). One homogeneous DP-SGD goes to Opacus'
    ``get_noise_multiplier``; anything else is bisected, first over the integer RDP orders
    (cheap, and never below the ε of all orders, so it overshoots σ), then over the ledger's own
    composition (:func:`compose_epsilon`, Opacus' orders) between 0.95× that σ and it. Cached:
    every message of a run plans the same σ.
    """
    from fedcl.privacy.dp import DPConfigError

    if not others and len({(q, g) for q, _s, g in training}) == 1 and training[0][2] == 1:
        steps = sum(s for _q, s, _g in training)
        return plan_noise(epsilon=epsilon, delta=delta, sample_rate=training[0][0], steps=steps)
    fixed = list(others)  # checked by the caller (_check_fixed_releases), which names them
    if not training:
        return 1.0  # nothing is trained at this site: σ is never used

    def history(sigma: float) -> list[tuple[float, ...]]:
        return [*((sigma, q, s, g) for q, s, g in training), *fixed]

    def exact(sigma: float) -> float:
        return compose_epsilon(history(sigma), delta, "rdp")

    low, high = 0.3, 1.0
    while _integer_order_epsilon(history(high), delta) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            steps = sum(s for _q, s, _g in training)
            raise DPConfigError(f"dp.epsilon = {epsilon} cannot be met with {steps} steps")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (
            (mid, high) if _integer_order_epsilon(history(mid), delta) > epsilon else (low, mid)
        )
    low = 0.95 * high
    if exact(low) <= epsilon:  # the integer orders were far off: search below as well
        return _planned_sigma_below(exact, epsilon, low)
    for _ in range(3):
        mid = (low + high) / 2
        low, high = (mid, high) if exact(mid) > epsilon else (low, mid)
    return high


def _planned_sigma_below(exact, epsilon: float, high: float) -> float:
    low = high / 2
    while exact(low) <= epsilon and low > 1e-3:
        low, high = low / 2, low
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (mid, high) if exact(mid) > epsilon else (low, mid)
    return high


def _integer_order_epsilon(history: list[tuple[float, ...]], delta: float) -> float:
    """ε(δ) of ``history`` over the integer RDP orders 2..64 only: ≥ the ledger's ε, and fast
    (Opacus' fractional orders need a series each)."""
    import warnings

    import numpy as np

    from fedcl.privacy.ledger.compose import group_rdp
    from fedcl.privacy.ledger.rdp_analysis import rdp_analysis

    orders = np.arange(2.0, 65.0)
    rdp = sum(group_rdp(h[0], h[1], int(h[2]), int(h[3]) if len(h) > 3 else 1, orders)
              for h in history)  # fmt: skip
    with warnings.catch_warnings():  # probes far from the answer sit at an end of the orders
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis().get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)
