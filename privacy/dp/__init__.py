"""DP-SGD at a site: Opacus wrapped as a trainer hook, plus the sampling and noise planning.

Why it looks the way it does:

* **A fresh PrivacyEngine per training call.** Privacy is accounted by the site's
  :class:`~fedcl.privacy.ledger.PrivacyLedger` over its whole history, never by the engine's
  accountant, which only sees one round (flwr#2216). The engine is a throw-away wrapper.
* **The caller's module is wrapped anew every call and unwrapped in** :meth:`DPHook.finish`.
  Wrapping an already-wrapped module fails or double-hooks (opacus#608), and a wrapped module's
  ``state_dict`` has ``_module.`` prefixes (opacus#435). The site keeps a reference to its plain
  module; after ``finish`` that module carries no Opacus hooks or attributes and its
  ``state_dict`` is exactly the non-private one.
* **Poisson sampling fitted to each task's N, with its small-data traps closed.** With
  ``batch_size >= N`` Opacus samples with q = 1.0 (``drop_last`` is ignored): no amplification
  at all. So the plan draws at least two batches per epoch (q ≤ 1/2, expected batch N/2 for a
  task smaller than the batch), refuses only a task whose expected batch would fall below
  ``dp.min_expected_batch`` (:func:`~.planning.sampling_plan` states the rule; the site refuses
  that task's rounds, not the run), and warns below eight. The expected batch is also set as a
  float: Opacus truncates ``N·q`` to an int, which biases the averaged gradient by up to
  1/⌊N·q⌋ (22% at N·q = 1.8).
* **Exactly the planned number of steps.** Opacus' sampler draws ``int(1/q)`` batches per epoch
  and ``1/(1/k)`` falls just below ``k`` for one batch count in thirteen (93, 99, ...), so we set
  the epoch length to the non-private loader's ``k = ceil(N/B)``. Hence the release recorded
  after training equals :func:`planned_release` computed before it, and a budget check done up
  front is exact.
* **Steps are accounted as Poisson draws**, an empty one included: each draw is one run of
  the subsampled Gaussian mechanism in the accountant's model, so an empty draw takes a
  noise-only step (zero clipped sum + the noise; ``fedcl.client.trainer``), never a skip,
  which would release "unchanged" exactly when the draw was empty.

Modules: :mod:`.planning` (sampling, steps and σ, known before training; no torch),
:mod:`.grad_sample` (the per-sample-gradient mode), :mod:`.hook` (:class:`DPHook`),
:mod:`.counts` (the noised evaluation counts) and :mod:`.seeding` (where every release's
draws come from: the OS, or a site's research seed). Every name is re-exported here.
"""

from __future__ import annotations

from .counts import (
    COUNT_SENSITIVITY,
    MECHANISM_EVALUATION,
    count_noise_sd,
    evaluation_release,
    noised_counts,
)
from .grad_sample import DEFAULT_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, choose_grad_sample_mode
from .hook import DPHook
from .planning import (
    MECHANISM_DP_SGD,
    MIN_BATCHES_PER_EPOCH,
    SMALL_EXPECTED_BATCH,
    DPConfigError,
    NoSamplingPlan,
    SamplingPlan,
    check_sample_rate,
    noise_from_spec,
    plan_noise,
    planned_release,
    sampling_plan,
)
from .seeding import release_seed

__all__ = [
    "COUNT_SENSITIVITY",
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "MECHANISM_DP_SGD",
    "MECHANISM_EVALUATION",
    "MIN_BATCHES_PER_EPOCH",
    "SMALL_EXPECTED_BATCH",
    "DPConfigError",
    "DPHook",
    "NoSamplingPlan",
    "SamplingPlan",
    "check_sample_rate",
    "choose_grad_sample_mode",
    "count_noise_sd",
    "evaluation_release",
    "noised_counts",
    "noise_from_spec",
    "plan_noise",
    "planned_release",
    "release_seed",
    "sampling_plan",
]
