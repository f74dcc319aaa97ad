"""The per-sample-gradient mode is a speed choice only: the privatised update and the privacy
spent are the same in every mode (hooks, ExpandedWeights, functorch, ghost clipping,
book-keeping).

Same seeds give the same Poisson draws and the same noise draws, so the weights after a whole
private ``fit`` must agree across modes up to float rounding; ghost clipping and book-keeping
get there by entirely different routes (norms first, then a second backward pass of the
clip-weighted losses; or one backward to the layer outputs, norms and clipped sums rebuilt from
activations), so a mode that skipped clipping or weighted the examples differently would not.

The models train in float64 here: in float32 a 1e-7 rounding difference between two exact
modes can flip one ReLU or max-pool decision, and over 10 steps the CNN's weights then differ by
1e-4 (ExpandedWeights vs hooks, measured), which says nothing about clipping. In float64 every
mode agrees with hooks to ~1e-16 on the CNN and on ResNet-18-GN.
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


pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")


#: (in_channels, image_size, build kwargs) per model; ResNet-18-GN at 1/8 width and 32x32 (at
#: 8x8 its last stage is 1x1, where GroupNorm over one value per group is degenerate).
_SHAPES: dict[str, tuple[int, int, dict]] = {
    "mlp": (1, 8, {}),
    "cnn": (1, 8, {}),
    "resnet18-gn": (3, 32, {"width": 0.125}),
}


def _data(n: int = 40, name: str = "mlp", dtype: torch.dtype = torch.float32) -> TensorDataset:
    channels, size, _ = _SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=gen) * 3.0  # norms well above CLIP
    return TensorDataset(x.to(dtype), torch.randint(0, 10, (n,), generator=gen))


def _model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    channels, size, kwargs = _SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, image_size=size, num_classes=10, **kwargs)
    return model.to(dtype)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class _OutputPenalty(BaseHook):
    """A per-example loss term (like LwF's): it must be clipped with the example's loss."""

    def extra_loss(self, inputs, outputs, targets):
        return 0.05 * outputs.pow(2).sum(dim=1)


def _private_fit(
    base: nn.Module,
    mode: str,
    *,
    extra: bool = False,
    name: str = "mlp",
    n: int = 40,
    epochs: int = 2,
    clip: float = CLIP,
):
    model = copy.deepcopy(base)
    dp = DPHook(
        noise_multiplier=SIGMA, max_grad_norm=clip, delta=DELTA, grad_sample_mode=mode, noise_seed=3
    )
    hooks = [dp, _OutputPenalty()] if extra else [dp]
    spec = TrainSpec(batch_size=8, local_epochs=epochs, lr=0.1, momentum=0.0)
    dtype = next(base.parameters()).dtype
    result = LocalTrainer(spec).fit(model, _data(n, name, dtype), hooks=hooks)
    return model, dp, result


# (model, examples, local epochs): ResNet-18-GN on fewer examples, one epoch (3 Poisson draws).
_CASES = [("mlp", 40, 2), ("cnn", 40, 2), ("resnet18-gn", 24, 1)]


@pytest.mark.parametrize(("name", "n", "epochs"), _CASES)
def test_every_mode_gives_the_same_private_update_and_spend(
    name: str, n: int, epochs: int, tmp_path
) -> None:
    base = _model(name, torch.float64)
    runs = {
        mode: _private_fit(base, mode, name=name, n=n, epochs=epochs) for mode in GRAD_SAMPLE_MODES
    }
    reference, ref_dp, ref_result = runs["hooks"]
    moved = float((_flat(reference) - _flat(base)).abs().max())
    assert moved > 1e-3  # the run trained; agreement below is not trivial
    release = planned_release(n, 8, epochs, SIGMA, DELTA)
    for mode, (model, dp, result) in runs.items():
        torch.testing.assert_close(_flat(model), _flat(reference), rtol=0, atol=1e-9, msg=mode)
        assert dp.grad_sample_mode == mode
        assert dp.release() == ref_dp.release() == release, mode
        assert result.steps == ref_result.steps and result.metrics == ref_result.metrics, mode
    spent = set()
    for mode, (_, dp, _) in runs.items():
        ledger = PrivacyLedger(tmp_path / mode)
        ledger.record(dp.release(), run_id="run", task_index=0, server_round=1)
        spent.add(ledger.epsilon(DELTA))
    assert len(spent) == 1  # one ε, whatever the mode


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_ghost_clips_each_examples_extra_loss_term_like_hooks(mode: str) -> None:
    base = _model("mlp")
    hooks_model, _, _ = _private_fit(base, "hooks", extra=True)
    ghost_model, _, _ = _private_fit(base, mode, extra=True)
    plain_ghost, _, _ = _private_fit(base, mode, extra=False)
    torch.testing.assert_close(_flat(ghost_model), _flat(hooks_model), rtol=0, atol=1e-6)
    assert float((_flat(ghost_model) - _flat(plain_ghost)).abs().max()) > 1e-4  # term counted


def test_bk_clips_each_example_exactly_on_the_cnn() -> None:
    """Book-keeping against an explicit per-example loop (float64), one clipped sum.

    Every conv route is taken: the CNN's first conv (p = 9) the patches, its second (32 -> 32
    on 8x8) the grouped kernel, its 4x4 convs the ghost norm; GroupNorms and the head their
    own rules. Without clipping the sum differs, so the clipping is what is compared.
    """
    from fedcl.privacy.dp.bookkeeping import BookKeeper, _conv_route

    model = _model("cnn", torch.float64).train()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    sizes = [8, 8, 4, 4]
    routes = [
        _conv_route(8, s * s, c.weight[0].numel(), c.out_channels, c.in_channels)
        for c, s in zip(convs, sizes, strict=True)
    ]
    assert routes == ["unfold", "grouped", "ghost", "ghost"]
    x, y = _data(8, "cnn", torch.float64)[:]
    params = list(model.parameters())
    per_example = [
        torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        for i in range(len(y))
    ]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per_example])
    assert float(norms.min()) > 2 * CLIP  # every example is clipped
    coef = (CLIP / (norms + 1e-6)).clamp(max=1.0)
    expected = [
        sum(c * gs[k] for c, gs in zip(coef, per_example, strict=True)) for k in range(len(params))
    ]
    keeper = BookKeeper(model, CLIP)
    keeper.attach()
    keeper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    keeper.detach()
    torch.testing.assert_close(keeper.last_norms, norms, rtol=1e-10, atol=0)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-12)
    unclipped = sum(gs[0] for gs in per_example)
    assert float((params[0].grad - unclipped).abs().max()) > 1e-3


def test_bk_refuses_layers_it_has_no_rule_for() -> None:
    vit = build_model("vit-tiny", in_channels=3, image_size=32, num_classes=10)
    dp = DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, grad_sample_mode="bk")
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.zeros(16).long())
    with pytest.raises(DPConfigError, match="'bk' supports only Linear, Conv2d"):
        LocalTrainer(TrainSpec(batch_size=8, local_epochs=1, lr=0.1)).fit(vit, data, hooks=[dp])
    assert not any(m._forward_hooks for m in vit.modules())


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_ghost_leaves_the_module_clean_for_the_next_round(mode: str) -> None:
    model = _model("mlp")
    spec = TrainSpec(batch_size=8, local_epochs=1, lr=0.1)
    for _ in range(2):  # the second fit would fail on left-over Opacus hooks
        dp = DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, grad_sample_mode=mode)
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
    assert chosen == {"mlp": "bk", "cnn": "bk", "resnet18-gn": "bk", "vit-tiny": "ew"}

    class Odd(nn.Module):  # a parameter outside any known layer: only hooks is safe
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.scale = nn.Parameter(torch.ones(1))

    assert choose_grad_sample_mode(Odd()) == "hooks"
    assert choose_grad_sample_mode(vit, "hooks") == "hooks"
    with pytest.raises(DPConfigError, match="valid: hooks, ew, functorch, ghost, bk"):
        choose_grad_sample_mode(vit, "book-keeping")


def test_weight_standardised_cnn_gets_the_same_private_update_where_a_mode_applies() -> None:
    """``ws = true`` (De et al.'s GroupNorm + weight standardisation): the automatic choice is
    hooks (Opacus' functorch rule for WSConv2d); functorch and ghost clipping give the same
    update; book-keeping, which has no rule for the layer, refuses by name."""
    torch.manual_seed(0)
    base = build_model("cnn", in_channels=1, image_size=8, num_classes=10, ws=True)
    base = base.to(torch.float64)
    assert choose_grad_sample_mode(base) == "hooks"
    runs = {mode: _private_fit(base, mode, name="cnn") for mode in ("hooks", "functorch", "ghost")}
    reference = _flat(runs["hooks"][0])
    assert float((reference - _flat(base)).abs().max()) > 1e-3
    for mode, (model, dp, _) in runs.items():
        torch.testing.assert_close(_flat(model), reference, rtol=0, atol=1e-9, msg=mode)
        assert dp.release() == runs["hooks"][1].release(), mode
    with pytest.raises(DPConfigError, match="WSConv2d"):
        _private_fit(base, "bk", name="cnn")
