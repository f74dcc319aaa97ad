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
* **Poisson sampling, with its small-data traps closed.** With ``batch_size >= N`` Opacus
  samples with q = 1.0 (``drop_last`` is ignored): no amplification at all. We refuse that,
  refuse an expected batch below one example, and warn below eight. The expected batch is also
  set as a float: Opacus truncates ``N·q`` to an int, which biases the averaged gradient by up
  to 1/⌊N·q⌋ (22% at N·q = 1.8).
* **Exactly the planned number of steps.** Opacus' sampler draws ``int(1/q)`` batches per epoch
  and ``1/(1/k)`` falls just below ``k`` for one batch count in thirteen (93, 99, ...), so we set
  the epoch length to the non-private loader's ``k = ceil(N/B)``. Hence the release recorded
  after training equals :func:`planned_release` computed before it, and a budget check done up
  front is exact.
* **Steps are accounted as Poisson draws**, including any empty batch the trainer skips:
  each draw is one run of the subsampled Gaussian mechanism in the accountant's model, so
  counting draws is the conservative choice.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedcl.config.errors import FedclError

from .ledger import DPRelease

logger = logging.getLogger("fedcl.privacy")

MECHANISM_DP_SGD = "dp-sgd"
#: Grad-sample modes that work with :class:`fedcl.client.trainer.LocalTrainer`. "ghost" is
#: excluded: it needs Opacus' own loss wrapper for its double backward pass (the trainer owns
#: its criterion), and it scales a penalty added to the loss by the mean clip factor, which
#: breaks the sensitivity argument (docs/notes/measurements.md, "Opacus 1.6").
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ew", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "hooks"
SMALL_EXPECTED_BATCH = 8.0
_OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")


class DPConfigError(FedclError, ValueError):
    """DP-SGD cannot run as configured (too little data, bad σ, unsupported mode or layer)."""


# ---------------------------------------------------------------------- sampling and planning


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

    Raises :class:`DPConfigError` (with the numbers) when q = 1.0 or q·N < 1; logs a warning
    when q·N < 8, where per-batch noise (σ·C / q·N) swamps the averaged gradient.
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
    if expected < 1.0:
        raise DPConfigError(
            f"expected batch size q·N = {sample_rate:.4g} × {n_examples} = {expected:.3g} is "
            "below 1 example: most Poisson batches would be empty; raise the sample rate "
            "(batch_size) or add data"
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


def sampling_plan(n_examples: int, batch_size: int) -> SamplingPlan:
    """The sampling DP-SGD will use for the trainer's loader over ``n_examples``.

    Mirrors the trainer (``batch_size = min(batch_size, N)``) and Opacus
    (``q = 1 / len(loader)``), and applies :func:`check_sample_rate`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DPConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    if n_examples < 1:
        raise DPConfigError(f"DP-SGD needs at least 1 training example, got {n_examples}")
    b = min(batch_size, n_examples)
    batches = -(-n_examples // b)
    plan = SamplingPlan(n_examples, batch_size, batches, 1.0 / batches)
    check_sample_rate(n_examples, plan.sample_rate, batch_size=batch_size)
    return plan


def planned_release(
    n_examples: int,
    batch_size: int,
    local_epochs: int,
    noise_multiplier: float,
    delta: float,
) -> DPRelease:
    """What one local training call with DP-SGD will spend, known before it starts.

    ``steps = local_epochs × ceil(N / B)``: exactly the Poisson draws :class:`DPHook` takes,
    so ``ledger.would_exceed(planned_release(...), budget, delta)`` decides the round
    before any example is touched.
    """
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
        raise DPConfigError(f"local_epochs must be a positive int, got {local_epochs!r}")
    _check_noise(noise_multiplier)
    plan = sampling_plan(n_examples, batch_size)
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


# ---------------------------------------------------------------------- grad-sample mode


def choose_grad_sample_mode(model: nn.Module, override: str | None = None) -> str:
    """The per-sample-gradient mode for ``model``: ``override`` if given, else "hooks".

    Every built-in model gets per-sample gradients equal to a per-example loop in hooks, ew and
    functorch (tests/test_models.py), so this is a speed choice. Measured through the site's
    training path (benchmarks/dp_throughput.py --all-modes, 1 thread, batch 64, shared 2-core
    box; samples/s hooks / ew / functorch): mlp 1x8x8 3496 / 4345 / 2401, cnn 1x8x8
    739 / 845 / 449, mlp 3x32x32 227 / 265 / 254, cnn 3x32x32 144 / 134 / 152,
    resnet18-gn 6 / 6 / 4, vit-tiny 261 / 256 / 204. ExpandedWeights ("ew") wins only on the
    cheap MLP/digit-CNN cases (+15-25%, within the box's drift) and ties or loses on the conv
    and attention models where DP time matters; it also supports only layers PyTorch knows
    and fails at run time on any other. Hooks is the robust default; DPSpec may later carry
    an explicit mode (``override``).
    """
    del model  # the choice does not depend on the architecture today
    return DEFAULT_GRAD_SAMPLE_MODE if override is None else _valid_mode(override)


def _valid_mode(mode: str) -> str:
    if mode not in GRAD_SAMPLE_MODES:
        why = (
            " (ghost clipping needs Opacus' loss wrapper, which the trainer does not use, and "
            "rescales regulariser terms in the loss)"
            if mode.startswith("ghost")
            else ""
        )
        raise DPConfigError(
            f"grad_sample_mode {mode!r} is not supported{why}; valid: "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
    return mode


# ---------------------------------------------------------------------- the trainer hook


class _CountingLoader:
    """Yields the DP loader's batches and counts each draw (an accounted mechanism run)."""

    def __init__(self, loader: Any, on_draw: Callable[[], None]):
        self._loader = loader
        self._on_draw = on_draw

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            self._on_draw()
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class DPHook:
    """DP-SGD for one :meth:`LocalTrainer.fit` call (the trainer's ``TrainHook`` protocol).

    Duck-typed rather than a ``BaseHook`` subclass: ``privacy`` sits below ``client`` and must
    not import it. Reusable: each ``setup`` wraps the plain module afresh and ``finish``
    unwraps it. After ``finish``, :meth:`release` says what was spent, for the ledger.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        grad_sample_mode: str | None = None,
        noise_seed: int | None = None,
        mechanism: str = MECHANISM_DP_SGD,
    ):
        _check_noise(noise_multiplier)
        if not (isinstance(max_grad_norm, int | float) and 0 < max_grad_norm < math.inf):
            raise DPConfigError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if not 0.0 < delta < 1.0:
            raise DPConfigError(f"delta must be in (0, 1), got {delta!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.grad_sample_mode_override = (
            None if grad_sample_mode is None else _valid_mode(grad_sample_mode)
        )
        self.noise_seed = noise_seed
        self.mechanism = mechanism
        self.grad_sample_mode: str | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.draws = 0
        self.noisy_steps = 0
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: Any = None

    # -- TrainHook protocol

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Wrap model, optimizer and loader with a fresh Opacus engine (Poisson sampling)."""
        from opacus import PrivacyEngine
        from opacus.grad_sample.gsm_base import AbstractGradSampleModule
        from opacus.validators.errors import UnsupportedModuleError

        if self._wrapped is not None:
            raise DPConfigError("DPHook.setup called again before finish: one fit at a time")
        if isinstance(model, AbstractGradSampleModule) or hasattr(
            model, "autograd_grad_sample_hooks"
        ):
            raise DPConfigError(
                "the model already carries Opacus wrappers or hooks (a previous DP round was "
                "not finished); pass the plain nn.Module (opacus#608)"
            )
        n = len(loader.dataset)
        batches = len(loader)
        if batches < 1:
            raise DPConfigError(f"DP-SGD needs at least 1 training example, got {n}")
        sample_rate = 1.0 / batches
        check_sample_rate(n, sample_rate, batch_size=getattr(loader, "batch_size", None))
        mode = choose_grad_sample_mode(model, self.grad_sample_mode_override)
        generator = None
        if self.noise_seed is not None:
            generator = torch.Generator(device=_device_of(model)).manual_seed(self.noise_seed)
        with warnings.catch_warnings():
            # Opacus warns on every engine that its noise comes from torch's PRNG rather than a
            # CSPRNG (secure_mode needs torchcsprng); say it once per process, not per round.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
        _note_insecure_rng_once()
        try:
            wrapped, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=mode,
                noise_generator=generator,
            )
        except UnsupportedModuleError as err:
            raise DPConfigError(f"the model cannot be trained with DP-SGD: {err}") from err
        dp_loader.batch_sampler.steps = batches  # k = ceil(N/B) draws, not int(1/(1/k))
        dp_optimizer.expected_batch_size = n * sample_rate  # a float: no truncation bias
        previous_hook = dp_optimizer.step_hook

        def count_step(opt: Any) -> None:
            self.noisy_steps += 1
            if previous_hook is not None:
                previous_hook(opt)

        dp_optimizer.attach_step_hook(count_step)
        self.grad_sample_mode = mode
        self.sample_rate = sample_rate
        self.expected_batch_size = n * sample_rate
        self.draws = 0
        self.noisy_steps = 0
        self._module, self._wrapped, self._optimizer = model, wrapped, dp_optimizer
        return wrapped, dp_optimizer, _CountingLoader(dp_loader, self._count_draw)

    def add_gradients(self, model: nn.Module) -> None:
        """DP adds nothing after privatisation (clipping and noise happen in ``pre_step``)."""
        return None

    def finish(self, model: nn.Module, result: Any) -> None:
        """Unwrap the module (no hooks, no ``_module.`` keys) and report what was spent."""
        self._unwrap()
        result.metrics.update(
            {
                "dp_sample_rate": float(self.sample_rate or 0.0),
                "dp_noise_multiplier": self.noise_multiplier,
                "dp_steps": float(self.draws),
                "dp_optimizer_steps": float(self.noisy_steps),
                "dp_max_grad_norm": self.max_grad_norm,
                "dp_expected_batch_size": float(self.expected_batch_size or 0.0),
            }
        )

    # -- what was spent

    def release(self) -> DPRelease:
        """The mechanism this hook ran, in the ledger's terms (after ``finish``)."""
        if self.sample_rate is None:
            raise DPConfigError("DPHook.release() before any training: nothing was spent")
        return DPRelease(
            mechanism=self.mechanism,
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=self.draws,
            delta=self.delta,
        )

    # -- internals

    def _count_draw(self) -> None:
        self.draws += 1

    def _unwrap(self) -> None:
        """Remove every Opacus hook and attribute so the plain module is clean and reusable.

        Also called if training raised (``close``), so a failed round cannot leave hooks on a
        module the site keeps using.
        """
        wrapped, module = self._wrapped, self._module
        self._wrapped = self._module = self._optimizer = None
        if wrapped is None or module is None:
            return
        close = getattr(wrapped, "_close", None)
        if close is not None:
            close()
        for p in module.parameters():
            for attr in _OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        if hasattr(module, "autograd_grad_sample_hooks"):  # pragma: no cover - defensive
            del module.autograd_grad_sample_hooks

    def close(self) -> None:
        """Unwrap without reporting: call from a ``finally`` if ``fit`` raised."""
        self._unwrap()


_RNG_NOTED = False


def _note_insecure_rng_once() -> None:
    global _RNG_NOTED
    if not _RNG_NOTED:
        _RNG_NOTED = True
        logger.info("DP-SGD noise comes from torch's PRNG (Opacus secure_mode is off)")


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
