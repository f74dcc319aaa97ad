"""An empty Poisson draw under DP-SGD is a noise-only step, in every grad-sample mode.

The accountant charges every draw as one run of the sampled Gaussian mechanism, which releases
Σ clipped gradients + N(0, σ²C²) even when the draw holds no example. Skipping the step would
release "model unchanged" exactly when the draw was empty, an event a lone example makes
1/(1−q) times less likely, with no noise to mask it. Without DP nothing is released, and an
empty batch is still skipped.

The sampler's outcome is forced by a double (every real Poisson draw passed on as its empty
slice); Opacus' optimizer, its noise generator and the trainer are real. A last test uses the
real sampler on two examples, where empty draws happen on their own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client.trainer import BaseHook, LocalTrainer
from fedcl.config.experiment import TrainSpec
from fedcl.models import build_model
from fedcl.privacy import GRAD_SAMPLE_MODES, DPHook, planned_release
from fedcl.privacy.dp.bookkeeping import BookKeeper

DELTA = 1e-5
SIGMA, CLIP, LR, SEED = 1.0, 0.5, 0.1, 3
N, BATCH, EPOCHS = 40, 8, 2  # k = 5 draws per epoch at q = 1/5: expected batch 8, 10 steps


pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


class _Draws:
    """Iterates a loader, recording each batch's size; ``empty`` passes each on as 0 examples."""

    def __init__(self, loader: Any, sizes: list[int], empty: bool):
        self._loader, self._sizes, self._empty = loader, sizes, empty

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            self._sizes.append(len(batch[1]))
            yield [t[:0] for t in batch] if self._empty else batch

    def __len__(self) -> int:
        return len(self._loader)


class _DrawProbe(BaseHook):
    """After DPHook: sees every draw (the double empties them) and counts regulariser calls.

    ``add_gradients`` stands for EWC's λF(θ−θ*), SI's and FedProx's terms: it must still run on
    a noise-only step, as on any other.
    """

    def __init__(self, *, empty: bool):
        self.empty = empty
        self.sizes: list[int] = []
        self.add_gradient_calls = 0

    def setup(self, model, optimizer, loader):
        return model, optimizer, _Draws(loader, self.sizes, self.empty)

    def add_gradients(self, model: nn.Module) -> None:
        self.add_gradient_calls += 1


def _data(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", in_channels=1, image_size=8, num_classes=10)


def _spec(epochs: int = EPOCHS) -> TrainSpec:
    return TrainSpec(batch_size=BATCH, local_epochs=epochs, lr=LR, momentum=0.0)


def _noise_only_weights(base: nn.Module, steps: int, expected_batch: float) -> list[torch.Tensor]:
    """What ``steps`` noise-only SGD steps give: Opacus' noise from the hook's seeded generator.

    Same order of draws as ``DPOptimizer.add_noise`` (one ``torch.normal`` per trainable
    parameter per step), the same division by the expected batch, the same SGD update.
    """
    generator = torch.Generator().manual_seed(SEED)  # DPHook's noise generator (noise_seed)
    weights = [p.detach().clone() for p in base.parameters() if p.requires_grad]
    for _ in range(steps):
        for w in weights:
            noise = torch.normal(0.0, SIGMA * CLIP, size=w.shape, generator=generator)
            grad = torch.zeros_like(w) + noise
            grad /= expected_batch
            w.add_(grad, alpha=-LR)
    return weights


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_draw_takes_a_noise_only_step(mode: str) -> None:
    base = _model()
    model = copy.deepcopy(base)
    dp = DPHook(
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        delta=DELTA,
        grad_sample_mode=mode,
        noise_seed=SEED,
    )
    probe = _DrawProbe(empty=True)
    result = LocalTrainer(_spec()).fit(model, _data(N), hooks=[dp, probe])

    steps = EPOCHS * 5
    assert dp.grad_sample_mode == mode
    assert len(probe.sizes) == steps and sum(probe.sizes) > 0  # real draws, all emptied
    # Every draw was accounted and every one released a noised step, regularisers included.
    assert dp.release() == planned_release(N, BATCH, EPOCHS, SIGMA, DELTA)
    assert dp.draws == dp.noisy_steps == result.steps == steps
    assert result.metrics["dp_optimizer_steps"] == result.metrics["dp_steps"] == steps
    assert probe.add_gradient_calls == steps
    assert result.loss == 0.0  # no example, no loss: not NaN from a mean over nothing

    after = [p.detach() for p in model.parameters() if p.requires_grad]
    before = [p.detach() for p in base.parameters() if p.requires_grad]
    change = torch.cat([(a - b).reshape(-1) for a, b in zip(after, before, strict=True)])
    assert float(change.abs().max()) > 0  # the model moved, by noise alone
    # Scale: each coordinate moves by N(0, steps·(lr·σ·C/E[b])²); thousands of coordinates.
    expected_sd = math.sqrt(steps) * LR * SIGMA * CLIP / dp.expected_batch_size
    assert dp.expected_batch_size == N / 5
    assert 0.9 < float(change.std()) / expected_sd < 1.1
    assert abs(float(change.mean())) < 0.05 * expected_sd
    # Exactly the DP optimizer's own noise (its seeded generator), not zero and not global RNG.
    expected = _noise_only_weights(base, steps, dp.expected_batch_size)
    for got, want in zip(after, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_without_dp_an_empty_batch_is_skipped() -> None:
    base = _model()
    model = copy.deepcopy(base)
    probe = _DrawProbe(empty=True)
    result = LocalTrainer(_spec()).fit(model, _data(N), hooks=[probe])
    assert len(probe.sizes) == EPOCHS * 5  # the batches came, each with no example
    assert result.steps == 0 and probe.add_gradient_calls == 0
    for p, q in zip(model.parameters(), base.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_the_real_sampler_draws_empty_batches_and_each_is_a_step(mode: str) -> None:
    """Two examples at q = 1/2: a draw is empty with probability 1/4 (12 draws, seeded)."""
    model = _model()
    dp = DPHook(
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        delta=DELTA,
        grad_sample_mode=mode,
        noise_seed=SEED,
    )
    probe = _DrawProbe(empty=False)
    result = LocalTrainer(_spec(epochs=6)).fit(model, _data(2), hooks=[dp, probe])
    assert dp.sample_rate == 0.5 and len(probe.sizes) == 12
    assert 0 in probe.sizes and any(probe.sizes)  # the seeded draws hold both kinds
    assert dp.draws == dp.noisy_steps == result.steps == probe.add_gradient_calls == 12
    assert math.isfinite(result.loss) and result.loss > 0  # a mean over the non-empty draws
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_bookkeeping_backward_of_an_empty_batch_is_a_zero_clipped_sum(name: str) -> None:
    """Were an empty batch run through bk's forward and backward, the clipped sum is 0.

    The trainer does not run the model on an empty draw, but ``BookKeeper.backward`` must not
    fail on one (its conv rule reads the first example's output shape).
    """
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, image_size=8, num_classes=10)
    keeper = BookKeeper(model, CLIP)
    keeper.attach()
    try:
        outputs = model(torch.randn(0, 1, 8, 8))
        keeper.backward(
            nn.functional.cross_entropy(outputs, outputs.new_zeros(0).long(), reduction="none")
        )
    finally:
        keeper.detach()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
