"""The trainer hook that runs DP-SGD with Opacus for one ``LocalTrainer.fit`` call.

A fresh ``PrivacyEngine`` per call, the caller's module wrapped anew and unwrapped in
:meth:`DPHook.finish`, exactly the planned number of Poisson draws, and each draw counted as one
run of the mechanism: the docstring of :mod:`fedcl.privacy.dp` says why.

**Randomness the adversary must not know.** The noise and the Poisson draws come from generators
seeded from the OS (:mod:`secrets`), never from torch's global RNG or the trainer's loader: a
simulation seeds those from the experiment seed (``RunPlan.initial_model``), which is public, so
noise drawn from them could be recomputed and subtracted, and the amplification by subsampling
assumes the sample is secret. Only a test, or a site's research seed (:mod:`.seeding`), asks
for fixed draws (``noise_seed``).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..ledger import DPRelease
from .bookkeeping import BookKeeper, bk_applies
from .grad_sample import NORM_ONLY_MODES, _valid_mode, choose_grad_sample_mode
from .planning import MECHANISM_DP_SGD, DPConfigError, _check_noise, sampling_plan

logger = logging.getLogger("fedcl.privacy")

_OPACUS_PARAM_ATTRS = (
    "grad_sample",
    "summed_grad",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
)


class _ExampleLosses(nn.Module):
    """The criterion handed to Opacus' ghost-clipping loss wrapper: the trainer's own losses.

    ``DPLossFastGradientClipping`` calls its criterion with ``reduction = "none"`` to get one
    loss per example; the trainer has already computed those (the objective's loss plus every
    hook's per-example term), so this criterion passes them through.
    """

    reduction = "mean"

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return losses if self.reduction == "none" else losses.mean()


class _CountingLoader:
    """Yields the DP loader's batches, or its batch sampler's index lists, and counts each
    draw (an accounted mechanism run)."""

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


def _physical_loader(
    dp_loader: Any, optimizer: Any, max_batch: int, on_draw: Callable[[], None]
) -> Any:
    """Opacus' ``BatchMemoryManager`` split: each Poisson draw in batches of at most
    ``max_batch`` examples, the optimizer told which one ends the draw (only that one adds
    noise and steps; the others clip and accumulate). ``wrap_data_loader`` would read the
    sampler off the loader; built here around the sampler counted before the split, since the
    ledger charges draws, not physical batches."""
    from opacus.utils.batch_memory_manager import BatchSplittingSampler
    from torch.utils.data import DataLoader

    sampler = BatchSplittingSampler(
        sampler=_CountingLoader(dp_loader.batch_sampler, on_draw),
        max_batch_size=max_batch,
        optimizer=optimizer,
    )
    return DataLoader(
        dataset=dp_loader.dataset,
        batch_sampler=sampler,
        num_workers=dp_loader.num_workers,
        collate_fn=dp_loader.collate_fn,
        pin_memory=dp_loader.pin_memory,
        generator=dp_loader.generator,
    )


def _average_copies_before_clipping(optimizer: Any, k: int) -> None:
    """Make ``optimizer.pre_step`` first replace each ``[B·K, …]`` per-sample gradient by the
    ``[B, …]`` mean over every example's K adjacent copies; Opacus then clips, sums and
    noises per example, and divides by the expected number of *examples*, as for K = 1."""
    original = optimizer.pre_step

    def mean_of(g: torch.Tensor) -> torch.Tensor:
        if len(g) % k:
            raise DPConfigError(
                f"a batch of {len(g)} per-sample gradients is not {k} copies per example: "
                "augmentation multiplicity needs the trainer's augmented batches"
            )
        return g.reshape(len(g) // k, k, *g.shape[1:]).mean(dim=1)

    def pre_step(closure: Any = None) -> Any:
        for p in optimizer.params:
            grad_sample = getattr(p, "grad_sample", None)
            if isinstance(grad_sample, torch.Tensor):
                p.grad_sample = mean_of(grad_sample)
            elif isinstance(grad_sample, list):  # several backward passes: one per pass
                p.grad_sample = [mean_of(g) for g in grad_sample]
        return original(closure)

    optimizer.pre_step = pre_step


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
        max_physical_batch: int | None = None,
        augmult: int = 1,
    ):
        """``max_physical_batch``: the most examples one forward/backward pass holds (the
        site's memory, ``site.toml``); a larger draw is split into several passes that add up
        to one noisy step (Opacus' ``BatchMemoryManager``): the same mechanism and charge.

        ``augmult``: the trainer's batches hold K adjacent augmented copies of each drawn
        example (``fedcl.client.augment``); each example's gradient is the mean of its K
        per-sample gradients before clipping, so one example still moves the clipped sum by at
        most C and the release is the one of K = 1. That needs the per-sample gradients
        themselves: ghost clipping and book-keeping only ever see their norms, so an automatic
        choice falls back to ``ew`` or ``hooks`` and an explicit ``ghost`` / ``bk`` is refused.
        """
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
        if max_physical_batch is not None and not (
            isinstance(max_physical_batch, int) and max_physical_batch >= 1
        ):
            raise DPConfigError(
                f"max_physical_batch must be an integer >= 1, got {max_physical_batch!r}"
            )
        self.max_physical_batch = max_physical_batch
        if not (isinstance(augmult, int) and augmult >= 1):
            raise DPConfigError(f"augmult must be an integer >= 1, got {augmult!r}")
        if augmult > 1 and self.grad_sample_mode_override in NORM_ONLY_MODES:
            raise DPConfigError(
                f"grad_sample_mode {self.grad_sample_mode_override!r} cannot average an "
                f"example's {augmult} augmented copies before clipping (it computes per-sample "
                "gradient norms only); use 'hooks', 'ew' or 'functorch', or "
                "train.augment.multiplicity = 1"
            )
        self.augmult = augmult
        self.grad_sample_mode: str | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None
        self.draws = 0
        self.noisy_steps = 0
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: Any = None
        self._criterion: Any = None
        self._bookkeeper: BookKeeper | None = None

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
        # The plan the site charged (planning.sampling_plan over N at the trainer's batch size,
        # which is min(B, N): the same k, since ceil(N/min(B, N)) and ceil(N/B) agree for B ≤ N
        # and both give the floor of 2 draws otherwise).
        plan = sampling_plan(n, int(getattr(loader, "batch_size", None) or n))
        batches, sample_rate = plan.batches_per_epoch, plan.sample_rate
        mode = choose_grad_sample_mode(
            model, self.grad_sample_mode_override, per_sample=self.augmult > 1
        )
        noise_seed, sample_seed = self._seeds()
        generator = torch.Generator(device=_device_of(model)).manual_seed(noise_seed)
        if mode == "bk" and not bk_applies(model):
            BookKeeper(model, self.max_grad_norm)  # raises, naming the unsupported layers
        with warnings.catch_warnings():
            # Opacus warns on every engine that its noise comes from torch's PRNG rather than a
            # CSPRNG (secure_mode needs torchcsprng); say it once per process, not per round.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
        _note_insecure_rng_once()
        try:
            private = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                criterion=_ExampleLosses(),
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=True,
                # bk: Opacus' ghost-clipping optimizer (noise on the clipped sum in p.grad),
                # its accountant and Poisson loader; bookkeeping.py replaces the two passes.
                grad_sample_mode="ghost" if mode == "bk" else mode,
                noise_generator=generator,
            )
        except UnsupportedModuleError as err:
            raise DPConfigError(f"the model cannot be trained with DP-SGD: {err}") from err
        if mode == "ghost":  # ghost clipping also wraps the criterion: two backward passes
            wrapped, dp_optimizer, self._criterion, dp_loader = private
        elif mode == "bk":  # one backward pass: Opacus' hooks off, the book-keeper's on
            wrapped, dp_optimizer, _, dp_loader = private
            wrapped.remove_hooks()
            self._bookkeeper = BookKeeper(model, self.max_grad_norm)
            self._bookkeeper.attach()
        else:
            (wrapped, dp_optimizer, dp_loader), self._criterion = private, None
        sampler = dp_loader.batch_sampler
        sampler.sample_rate = dp_loader.sample_rate = sample_rate  # 1/k, not 1/len(loader)
        sampler.steps = batches  # k draws, not int(1/(1/k))
        sampler.generator = torch.Generator().manual_seed(sample_seed)  # not the loader's
        dp_optimizer.expected_batch_size = n * sample_rate  # a float: no truncation bias
        previous_hook = dp_optimizer.step_hook

        def count_step(opt: Any) -> None:
            self.noisy_steps += 1
            if previous_hook is not None:
                previous_hook(opt)

        dp_optimizer.attach_step_hook(count_step)
        if self.augmult > 1:
            _average_copies_before_clipping(dp_optimizer, self.augmult)
        self.grad_sample_mode = mode
        self.sample_rate = sample_rate
        self.expected_batch_size = n * sample_rate
        self.draws = 0
        self.noisy_steps = 0
        self._module, self._wrapped, self._optimizer = model, wrapped, dp_optimizer
        if self.max_physical_batch is not None:
            physical = _physical_loader(
                dp_loader, dp_optimizer, self.max_physical_batch, self._count_draw
            )
            return wrapped, dp_optimizer, physical
        return wrapped, dp_optimizer, _CountingLoader(dp_loader, self._count_draw)

    def runs_backward(self) -> bool:
        """Whether this hook runs the backward pass itself (ghost, bk), from losses."""
        return self._criterion is not None or self._bookkeeper is not None

    def backward(self, losses: torch.Tensor) -> None:
        """Ghost clipping's backward from the per-example losses (``[batch]``).

        Opacus' ``DPTensorFastGradientClipping.backward``: a first pass for the per-sample
        gradient norms, then a second of Σᵢ cᵢ·lossᵢ with cᵢ = min(1, C/‖gᵢ‖), which leaves
        the clipped sum in ``p.grad`` for the optimizer's noise.
        """
        if self._bookkeeper is not None:  # bk: one pass, clipped sum straight into p.grad
            self._bookkeeper.backward(losses)
            return
        if self._criterion is None:
            raise DPConfigError("DPHook.backward is for ghost clipping; use loss.backward()")
        with warnings.catch_warnings():
            # The second pass runs with Opacus' hooks disabled; PyTorch still says, per layer,
            # that a full backward hook fires on outputs only (the inputs need no grad).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            self._criterion(losses).backward()

    def add_gradients(self, model: nn.Module) -> None:
        """DP adds nothing after privatisation (clipping and noise happen in ``pre_step``)."""
        return None

    def finish(self, model: nn.Module, result: Any) -> None:
        """Unwrap the module (no hooks, no ``_module.`` keys) and report what was spent.

        The report is the site's own: the sample rate is 1/ceil(N/B) and the expected batch
        N·q, so together they give the training-set size N. The ClientApp never sends them (its
        reply lets through only ``fedcl.client.privacy_site.RELEASED_HOOK_METRICS``); they go
        to the site's log, and the ledger keeps (σ, q, steps).
        """
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

    def _seeds(self) -> tuple[int, int]:
        """(noise seed, sampling seed): from the OS, or derived from ``noise_seed`` in tests."""
        if self.noise_seed is not None:
            return self.noise_seed, self.noise_seed + 1
        return secrets.randbits(63), secrets.randbits(63)

    def _count_draw(self) -> None:
        self.draws += 1

    def _unwrap(self) -> None:
        """Remove every Opacus hook and attribute so the plain module is clean and reusable.

        Also called if training raised (``close``), so a failed round cannot leave hooks on a
        module the site keeps using.
        """
        wrapped, module = self._wrapped, self._module
        if self._bookkeeper is not None:
            self._bookkeeper.detach()
            self._bookkeeper = None
        self._wrapped = self._module = self._optimizer = self._criterion = None
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
        logger.info(
            "DP-SGD noise and sampling come from torch generators seeded from the OS "
            "(Opacus secure_mode, a CSPRNG, is off)"
        )


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
