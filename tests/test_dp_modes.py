"""The per-sample-gradient mode is a speed choice only: the privatised update and the privacy
spent are the same in every mode (hooks, ExpandedWeights, functorch, ghost clipping).

Same seeds give the same Poisson draws and the same noise draws, so the weights after a whole
private ``fit`` must agree across modes up to float rounding; ghost clipping gets there by an
entirely different route (norms first, then a backward pass of the clip-weighted losses), so a
mode that skipped clipping or weighted the examples differently would not.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcl.client.trainer import BaseHook, LocalTrainer
from fedcl.config.experiment import TrainSpec
from fedcl.models import build_model
from fedcl.privacy import (
    GRAD_SAMPLE_MODES,
    DPConfigError,
    DPHook,
    PrivacyLedger,
    choose_grad_sample_mode,
    planned_release,
)

DELTA = 1e-5
SIGMA, CLIP = 0.7, 0.5


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        yield


def _data(n: int = 40) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=gen) * 3.0  # per-sample norms well above CLIP
    return TensorDataset(x, torch.randint(0, 10, (n,), generator=gen))


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=1, image_size=8, num_classes=10)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _OutputPenalty(BaseHook):
    """A per-example loss term (like LwF's): it must be clipped with the example's loss."""

    def extra_loss(self, inputs, outputs, targets):
        return 0.05 * outputs.pow(2).sum(dim=1)


def _private_fit(base: nn.Module, mode: str, *, extra: bool = False):
    model = copy.deepcopy(base)
    dp = DPHook(
        noise_multiplier=SIGMA, max_grad_norm=CLIP, delta=DELTA, grad_sample_mode=mode, noise_seed=3
    )
    hooks = [dp, _OutputPenalty()] if extra else [dp]
    spec = TrainSpec(batch_size=8, local_epochs=2, lr=0.1, momentum=0.0)
    result = LocalTrainer(spec).fit(model, _data(), hooks=hooks)
    return model, dp, result


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_mode_gives_the_same_private_update_and_spend(name: str, tmp_path) -> None:
    base = _model(name)
    runs = {mode: _private_fit(base, mode) for mode in GRAD_SAMPLE_MODES}
    reference, ref_dp, ref_result = runs["hooks"]
    moved = float((_flat(reference) - _flat(base)).abs().max())
    assert moved > 1e-3  # the run trained; agreement below is not trivial
    release = planned_release(40, 8, 2, SIGMA, DELTA)
    for mode, (model, dp, result) in runs.items():
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=0, atol=1e-6, msg=mode)
        assert dp.grad_sample_mode == mode
        assert dp.release() == ref_dp.release() == release, mode
        assert result.steps == ref_result.steps and result.metrics == ref_result.metrics, mode
    spent = set()
    for mode, (_, dp, _) in runs.items():
        ledger = PrivacyLedger(tmp_path / mode)
        ledger.record(dp.release(), run_id="run", task_index=0, server_round=1)
        spent.add(ledger.epsilon(DELTA))
    assert len(spent) == 1  # one ε, whatever the mode


def test_ghost_clips_each_examples_extra_loss_term_like_hooks() -> None:
    base = _model("mlp")
    hooks_model, _, _ = _private_fit(base, "hooks", extra=True)
    ghost_model, _, _ = _private_fit(base, "ghost", extra=True)
    plain_ghost, _, _ = _private_fit(base, "ghost", extra=False)
    torch.testing.assert_close(_flat(ghost_model), _flat(hooks_model), rtol=0, atol=1e-6)
    assert float((_flat(ghost_model) - _flat(plain_ghost)).abs().max()) > 1e-4  # term counted


def test_ghost_leaves_the_module_clean_for_the_next_round() -> None:
    model = _model("mlp")
    spec = TrainSpec(batch_size=8, local_epochs=1, lr=0.1)
    for _ in range(2):  # the second fit would fail on left-over Opacus hooks
        dp = DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, grad_sample_mode="ghost")
        LocalTrainer(spec).fit(model, _data(), hooks=[dp])
        assert not dp.runs_backward()  # unwrapped: the trainer's own backward again
    for p in model.parameters():
        assert not hasattr(p, "_norm_sample") and not hasattr(p, "grad_sample")
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(k.startswith("_module.") for k in model.state_dict())


def test_mode_is_chosen_per_architecture() -> None:
    chosen = {}
    for name, channels, size in [("mlp", 1, 8), ("cnn", 1, 8), ("resnet18-gn", 3, 32)]:
        torch.manual_seed(0)
        model = build_model(name, in_channels=channels, image_size=size, num_classes=10)
        chosen[name] = choose_grad_sample_mode(model)
    vit = build_model("vit-tiny", in_channels=3, image_size=32, num_classes=10)
    chosen["vit-tiny"] = choose_grad_sample_mode(vit)
    assert chosen == {"mlp": "ghost", "cnn": "ew", "resnet18-gn": "ew", "vit-tiny": "ew"}

    class Odd(nn.Module):  # a parameter outside any known layer: only hooks is safe
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.scale = nn.Parameter(torch.ones(1))

    assert choose_grad_sample_mode(Odd()) == "hooks"
    assert choose_grad_sample_mode(vit, "hooks") == "hooks"
    with pytest.raises(DPConfigError, match="valid: hooks, ew, functorch, ghost"):
        choose_grad_sample_mode(vit, "bk")
