"""A Poisson draw larger than the site's memory allows is split into physical batches.

``DPHook(max_physical_batch=M)`` puts Opacus' ``BatchSplittingSampler`` (what its
``BatchMemoryManager`` uses) behind the Poisson sampler: a draw of more than M examples goes
through the model in passes of at most M whose clipped per-example gradients accumulate, and
only the pass that ends the draw adds the noise and steps. Same draws, same noise, same charge:
the trained weights equal the unsplit run's up to float summation order, in every grad-sample
mode, while no forward pass holds more than M examples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client.trainer import BaseHook, LocalTrainer
from fedcl.config.experiment import TrainSpec
from fedcl.models import build_model
from fedcl.privacy import GRAD_SAMPLE_MODES, DPHook, planned_release
from fedcl.privacy.dp.planning import DPConfigError

DELTA, SIGMA, CLIP, LR, SEED = 1e-5, 1.0, 0.5, 0.5, 11
N, BATCH, EPOCHS, PHYSICAL = 96, 24, 2, 5  # k = 4 draws an epoch of ~24 examples, passes of <= 5

pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


class _Regulariser(BaseHook):
    """Stands for EWC's, SI's and FedProx's gradient terms: added once per noisy step."""

    def __init__(self) -> None:
        self.calls = 0

    def add_gradients(self, model: nn.Module) -> None:
        self.calls += 1


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.randn(N, 1, 8, 8, generator=gen), torch.randint(0, 10, (N,), generator=gen)
    )


def _train(mode: str, physical: int | None) -> tuple[nn.Module, DPHook, object, list[int], int]:
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    passes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: passes.append(len(args[0])))
    dp = DPHook(
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        delta=DELTA,
        grad_sample_mode=mode,
        noise_seed=SEED,
        max_physical_batch=physical,
    )
    regulariser = _Regulariser()
    spec = TrainSpec(batch_size=BATCH, local_epochs=EPOCHS, lr=LR, momentum=0.0)
    result = LocalTrainer(spec).fit(model, _data(), hooks=[dp, regulariser])
    handle.remove()
    return model, dp, result, passes, regulariser.calls


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_a_split_draw_is_the_same_noisy_step_and_the_same_charge(mode: str) -> None:
    whole, dp_whole, res_whole, passes_whole, reg_whole = _train(mode, None)
    split, dp_split, res_split, passes_split, reg_split = _train(mode, PHYSICAL)

    steps = EPOCHS * 4
    # The memory bound holds, and it did split (draws of ~24 examples into passes of <= 5).
    assert max(passes_split) <= PHYSICAL < max(passes_whole)
    assert len(passes_split) > 3 * steps
    assert sum(passes_split) == sum(passes_whole)  # the same examples drawn, in smaller passes
    # One accounted draw, one noisy step and one regulariser call per draw, as unsplit.
    assert dp_split.draws == dp_split.noisy_steps == res_split.steps == steps
    assert dp_whole.draws == res_whole.steps == reg_whole == reg_split == steps
    assert (
        dp_split.release() == dp_whole.release() == planned_release(N, BATCH, EPOCHS, SIGMA, DELTA)
    )
    moved = 0.0
    for a, b, start in zip(
        split.parameters(), whole.parameters(), _initial().parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        moved = max(moved, float((a - start).detach().abs().max()))
    assert moved > 1e-2  # it trained: the equality is not two untouched models


def _initial() -> nn.Module:
    torch.manual_seed(0)
    return copy.deepcopy(build_model("mlp", in_channels=1, image_size=8, num_classes=10))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_a_bad_physical_batch_is_a_clear_error(bad: object) -> None:
    with pytest.raises(DPConfigError, match="max_physical_batch must be an integer >= 1"):
        DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, max_physical_batch=bad)
