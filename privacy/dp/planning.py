"""Planning DP-SGD before any example is touched: Poisson sampling, steps and noise.

:func:`sampling_plan` mirrors the trainer's loader and Opacus' sampler (q = 1 / ceil(N/B)) and
refuses sampling that amplifies nothing (:func:`check_sample_rate`); :func:`planned_release` is
exactly what one training call will spend, so a budget check done up front is exact;
:func:`plan_noise` finds the σ that lands a whole run at a target ε. Why each rule: the
docstring of :mod:`fedcl.privacy.dp`.

Loads neither torch nor Opacus at import (Opacus only inside :func:`plan_noise`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from fedcl.config.errors import FedclError

from ..ledger import DPRelease

logger = logging.getLogger("fedcl.privacy")

MECHANISM_DP_SGD = "dp-sgd"
SMALL_EXPECTED_BATCH = 8.0
#: Fewest Poisson draws per epoch: q ≤ 1/2, so every example sits out half the draws and
#: subsampling amplifies; with q = 1 every draw holds every example and nothing does.
MIN_BATCHES_PER_EPOCH = 2
#: The smallest expected batch a plan may have unless the experiment says otherwise
#: (``dp.min_expected_batch``): one example at q = 1/2, so every task with an example has a
#: plan and trains. Below 1/2 more than half the draws are empty ((1 − q)^N ≥ 1 − q·N).
MIN_EXPECTED_BATCH = 0.5


class DPConfigError(FedclError, ValueError):
    """DP-SGD cannot run as configured (too little data, bad σ, unsupported mode or layer)."""


class NoSamplingPlan(DPConfigError):
    """No sampling plan within the experiment's bounds fits this task's N at this site.

    A property of one task at one site, not of the run: the site refuses that task's rounds
    (a status naming the numbers) and trains the others.
    """


@dataclass(frozen=True)
class SamplingPlan:
    """How Poisson sampling will draw batches from ``n_examples`` at ``batch_size``."""

    n_examples: int
    batch_size: int
    batches_per_epoch: int
    sample_rate: float

    @property
    def expected_batch_size(self) -> float:
        return self.n_examples * self.sample_rate


def check_sample_rate(
    n_examples: int, sample_rate: float, *, batch_size: int | None = None
) -> None:
    """Refuse sampling that gives no privacy amplification or mostly empty batches.

    Raises :class:`DPConfigError` (with the numbers) when q = 1.0 or q·N < 1/2, where more
    than half the draws are empty ((1 − q)^N ≥ 1 − q·N); logs a warning when q·N < 8, where
    per-batch noise (σ·C / q·N) swamps the averaged gradient.
    """
    if n_examples < 1:
        raise DPConfigError(f"DP-SGD needs at least 1 training example, got {n_examples}")
    if not 0.0 < sample_rate <= 1.0:
        raise DPConfigError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if sample_rate >= 1.0:
        given = f"batch_size {batch_size} >= " if batch_size is not None else ""
        hint = f"a batch_size of at most {max(n_examples // 2, 1)}" if n_examples > 1 else None
        raise DPConfigError(
            f"DP-SGD with {given}{n_examples} training example(s) gives sample rate q = 1.0: "
            "Poisson sampling would put every example in every batch (Opacus ignores "
            "drop_last), so subsampling amplifies nothing and ε grows much faster; "
            + (f"use {hint} or add data" if hint else "add data (one example cannot be sampled)")
        )
    expected = n_examples * sample_rate
    if expected < MIN_EXPECTED_BATCH:
        raise DPConfigError(
            f"expected batch size q·N = {sample_rate:.4g} × {n_examples} = {expected:.3g} is "
            f"below {MIN_EXPECTED_BATCH:g} example: most Poisson batches would be empty; raise "
            "the sample rate (batch_size) or add data"
        )
    if expected < SMALL_EXPECTED_BATCH:
        logger.warning(
            "DP-SGD expected batch size q·N = %.3g × %d = %.2f is below %d: the noise (σ·C/%.2f "
            "per coordinate) will dominate the averaged gradient; raise batch_size or add data",
            sample_rate,
            n_examples,
            expected,
            int(SMALL_EXPECTED_BATCH),
            expected,
        )


def sampling_plan(
    n_examples: int, batch_size: int, *, min_expected_batch: float = MIN_EXPECTED_BATCH
) -> SamplingPlan:
    """The Poisson sampling DP-SGD uses for one task's ``n_examples``, fitted to that N.

    The rule, with B = ``train.batch_size`` (the largest expected batch the experiment allows)
    and m = ``dp.min_expected_batch`` (the smallest):

    * batches per epoch ``k = max(ceil(N / B), 2)``, sample rate ``q = 1 / k``: a task with
      at least B examples draws like the non-private loader (``ceil(N/B)`` batches of
      expected size ``N/k ≤ B``); a smaller one gets two draws of expected size ``N/2``
      instead of q = 1, where subsampling amplifies nothing (Opacus ignores ``drop_last``);
    * steps: ``local_epochs × k`` (:func:`planned_release`), so each epoch still sees every
      example once in expectation;
    * a task whose expected batch ``N·q`` falls below m has no plan: :class:`NoSamplingPlan`
      (the site refuses that task, not the run). Below 8 expected examples it warns: the noise
      σ·C/(N·q) then swamps the averaged gradient.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DPConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if n_examples < 1:
        raise NoSamplingPlan(f"DP-SGD needs at least 1 training example, got {n_examples}")
    batches = max(-(-n_examples // batch_size), MIN_BATCHES_PER_EPOCH)
    plan = SamplingPlan(n_examples, batch_size, batches, 1.0 / batches)
    if plan.expected_batch_size < min_expected_batch:
        raise NoSamplingPlan(
            f"{n_examples} training example(s) give an expected batch of "
            f"{plan.expected_batch_size:.3g} at the largest sample rate q = 1/"
            f"{MIN_BATCHES_PER_EPOCH} that still amplifies, below dp.min_expected_batch = "
            f"{min_expected_batch:g}"
        )
    check_sample_rate(n_examples, plan.sample_rate, batch_size=batch_size)
    return plan


def planned_release(
    n_examples: int,
    batch_size: int,
    local_epochs: int,
    noise_multiplier: float,
    delta: float,
    *,
    min_expected_batch: float = MIN_EXPECTED_BATCH,
) -> DPRelease:
    """What one local training call with DP-SGD will spend, known before it starts.

    ``steps = local_epochs × k`` with k from :func:`sampling_plan`: exactly the Poisson draws
    :class:`DPHook` takes,
    so ``ledger.would_exceed(planned_release(...), budget, delta)`` decides the round
    before any example is touched.
    """
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        raise DPConfigError(f"local_epochs must be a positive int, got {local_epochs!r}")
    _check_noise(noise_multiplier)
    plan = sampling_plan(n_examples, batch_size, min_expected_batch=min_expected_batch)
    return DPRelease(
        mechanism=MECHANISM_DP_SGD,
        sample_rate=plan.sample_rate,
        noise_multiplier=float(noise_multiplier),
        steps=local_epochs * plan.batches_per_epoch,
        delta=delta,
    )


def plan_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """The smallest σ (to 0.01 in ε) whose ``steps`` releases at ``sample_rate`` stay ≤ ε.

    For the target-ε mode of :class:`~fedcl.config.experiment.DPSpec`: ``steps`` are all the
    steps the run will take at this site (rounds × local epochs × batches per epoch), so the
    whole run, not one round, lands at ε. Uses Opacus' own binary search, so the ledger's
    composition of those steps reports at most ``epsilon``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        raise DPConfigError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise DPConfigError(f"delta must be in (0, 1), got {delta!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise DPConfigError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise DPConfigError(f"steps must be a positive int, got {steps!r}")
    try:
        with warnings.catch_warnings():
            # The search probes σ = 20, 40, ... whose ε is tiny at the largest RDP order; the
            # warning is about those probes, not the answer (the ledger recomposes it).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            sigma = get_noise_multiplier(
                target_epsilon=float(epsilon),
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.01,
            )
        return float(sigma)
    except ValueError as err:
        raise DPConfigError(
            f"no noise multiplier reaches ε = {epsilon} at δ = {delta} over {steps} steps at "
            f"sample rate {sample_rate:.4g} ({err}); raise epsilon or train fewer steps"
        ) from err


def noise_from_spec(dp: Any, *, sample_rate: float, planned_steps: int) -> float:
    """σ for a ``DPSpec``: its ``noise_multiplier`` if set, else planned from its ``epsilon``.

    ``planned_steps`` are the steps of the whole run at this site (see :func:`plan_noise`).
    """
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if dp.epsilon is not None:
        return plan_noise(
            epsilon=dp.epsilon, delta=dp.delta, sample_rate=sample_rate, steps=planned_steps
        )
    raise DPConfigError(
        "dp.enabled = true needs dp.noise_multiplier (e.g. 1.0) or a target dp.epsilon (e.g. 8.0)"
    )


def _check_noise(noise_multiplier: float) -> None:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise DPConfigError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
