"""Model zoo contract: every registered model builds, is Opacus-valid and gets exact per-sample
gradients, so DP-SGD clients can pick any of them from config without surprises."""

import warnings
from collections.abc import Iterator

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

from fedcl.models import (
    ModelError,
    available_models,
    build_model,
    count_parameters,
    min_image_size,
)
from fedcl.models.norm import num_groups

SHAPES = [(1, 8), (3, 32)]  # (in_channels, image_size): digits and CIFAR
BATCH = 3
NUM_CLASSES = 10
REL_TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run this module's tiny tensors on one intra-op thread.

    The batches here are a few samples; with 2+ OpenMP threads on a shared CI box the threads
    spin-wait on each other and the module ran ~10x slower (60 s instead of ~6 s) under load.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet_hooks() -> Iterator[None]:
    """Silence warnings that are expected here and say nothing about the models.

    Opacus registers full backward hooks on every layer; the first layer's input does not
    require grad, so PyTorch warns that the hook fires with respect to module outputs only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _build(name: str, in_channels: int, image_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        name, in_channels=in_channels, image_size=image_size, num_classes=NUM_CLASSES
    )


def _batch(in_channels: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, in_channels, image_size, image_size, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    return x, y


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


#: The image classifiers; the dual encoder (built from one of them) is tested in test_vl.py.
ZOO = [m for m in available_models() if m != "dual-encoder"]
#: Every (model, in_channels, image_size) of SHAPES the model accepts (scatter-cnn needs >= 16).
ZOO_SHAPES = [(n, c, s) for n in ZOO for c, s in SHAPES if s >= min_image_size(n)]


def test_available_models() -> None:
    assert available_models() == [
        "cnn", "dual-encoder", "mlp", "resnet18-gn", "scatter-cnn", "vit-tiny"
    ]  # fmt: skip


@pytest.mark.parametrize("name,in_channels,image_size", ZOO_SHAPES)
def test_output_shape_and_validator(name: str, in_channels: int, image_size: int) -> None:
    model = _build(name, in_channels, image_size)
    x, _ = _batch(in_channels, image_size)
    assert model(x).shape == (BATCH, NUM_CLASSES)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("mode", ["hooks", "ew"])
@pytest.mark.parametrize("name,in_channels,image_size", ZOO_SHAPES)
def test_per_sample_grads_sum_to_batch_grad(
    name: str, in_channels: int, image_size: int, mode: str
) -> None:
    """Per-sample grads must exist for every parameter and add up to the ordinary gradient.

    Shape checks alone would pass for a grad sampler that ignores part of the model (e.g. a
    cls token): comparing the sum with autograd's gradient of the summed loss catches it.
    """
    x, y = _batch(in_channels, image_size)
    reference = _build(name, in_channels, image_size)
    nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()

    model = _build(name, in_channels, image_size)
    wrapped: nn.Module
    if mode == "hooks":
        wrapped = GradSampleModule(model, loss_reduction="sum")
    else:
        wrapped = GradSampleModuleExpandedWeights(model, loss_reduction="sum")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()

    ref_params = dict(reference.named_parameters())
    for pname, param in model.named_parameters():
        grad_sample = getattr(param, "grad_sample", None)
        assert grad_sample is not None, f"{name}: no per-sample grad for {pname}"
        assert grad_sample.shape == (BATCH, *param.shape), pname
        err = _rel_err(grad_sample.sum(0), ref_params[pname].grad)
        assert err < REL_TOL, f"{name}/{pname}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ZOO)
def test_ghost_clipping_norms_match_per_sample_grads(name: str) -> None:
    """Ghost clipping computes per-sample norms without materialising grads; they must agree."""
    size = max(8, min_image_size(name))
    x, y = _batch(1, size)
    model = _build(name, 1, size)
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    expected = torch.stack(
        [p.grad_sample.reshape(BATCH, -1).norm(dim=1) for p in model.parameters()], dim=1
    ).norm(dim=1)

    ghost = GradSampleModuleFastGradientClipping(
        _build(name, 1, size), loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True
    )
    nn.functional.cross_entropy(ghost(x), y, reduction="sum").backward()
    assert _rel_err(ghost.get_norm_sample(), expected) < REL_TOL


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet50", in_channels=3, image_size=32, num_classes=10)
    for valid in available_models():
        assert valid in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_parameters_raise_model_error() -> None:
    with pytest.raises(ModelError, match=r"patch sizes .*\[1, 2, 3, 5, 6, 10, 15\]"):
        build_model("vit-tiny", in_channels=3, image_size=30, num_classes=10, patch_size=4)
    with pytest.raises(ModelError, match="valid heads"):
        build_model("vit-tiny", in_channels=3, image_size=32, num_classes=10, heads=5)
    with pytest.raises(ModelError, match="does not accept"):
        build_model("cnn", in_channels=3, image_size=32, num_classes=10, depth=3)
    with pytest.raises(ModelError, match="image_size >= 8"):
        build_model("resnet18-gn", in_channels=3, image_size=4, num_classes=10)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", in_channels=1, image_size=8, num_classes=0)
    with pytest.raises(ModelError, match="width"):
        build_model("resnet18-gn", in_channels=3, image_size=32, num_classes=10, width=0)
    with pytest.raises(ModelError, match="ws must be true or false, got 'yes'"):
        build_model("cnn", in_channels=3, image_size=32, num_classes=10, ws="yes")


def test_parameter_counts() -> None:
    resnet = _build("resnet18-gn", 3, 32)
    assert 11_000_000 <= count_parameters(resnet) <= 11_300_000
    assert 50_000 <= count_parameters(_build("cnn", 3, 32)) <= 100_000
    # Adaptive pooling: the CNN's parameter vector does not depend on the image size.
    assert count_parameters(_build("cnn", 3, 8)) == count_parameters(_build("cnn", 3, 32))
    mlp = build_model("mlp", in_channels=1, image_size=8, num_classes=10, hidden=(32,))
    assert count_parameters(mlp) == 64 * 32 + 32 + 32 * 10 + 10


def test_model_kwargs() -> None:
    narrow = build_model("resnet18-gn", in_channels=3, image_size=8, num_classes=5, width=0.25)
    assert count_parameters(narrow) < count_parameters(_build("resnet18-gn", 3, 8)) / 10
    assert narrow(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    vit = build_model("vit-tiny", in_channels=3, image_size=32, num_classes=4, patch_size=8)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert num_groups(64) == 32 and num_groups(16) == 16 and num_groups(24) == 24
    assert num_groups(48) == 24


def test_cnn_learns_bright_vs_dark() -> None:
    """A model that cannot fit a trivially separable problem has a wiring bug.

    Images are in [0, 1] like un-normalised pixels. GroupNorm partly normalises absolute
    brightness away, so this is less trivial than it looks: Adam at lr=1e-2 stalled at the
    majority class for 1 of 10 seeds, lr=3e-3 reached 100% within 6 steps for all 10.
    """
    gen = torch.Generator().manual_seed(0)
    n = 128
    labels = torch.randint(0, 2, (n,), generator=gen)
    images = (
        0.2 + 0.6 * labels.view(n, 1, 1, 1).float() + 0.1 * torch.randn(n, 1, 8, 8, generator=gen)
    )

    torch.manual_seed(0)
    model = build_model("cnn", in_channels=1, image_size=8, num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % n
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize(
    "name,size,options", [("cnn", 8, {}), ("resnet18-gn", 32, {"width": 0.125})]
)
def test_weight_standardised_convs_get_exact_per_sample_grads(
    name: str, size: int, options: dict, mode: str
) -> None:
    """``ws = true``: each filter is used standardised, and Opacus (its functorch rule for a
    layer it has no rule for) gives each example exactly its own gradient through it.

    The ResNet at 32 px: at 8 px its last stage is 1x1, where a GroupNorm group of one value
    normalises to 0 and the gradients through it are rounding noise (with or without ws)."""
    from fedcl.models.norm import WSConv2d
    from fedcl.privacy import choose_grad_sample_mode

    def build() -> nn.Module:
        torch.manual_seed(0)
        return build_model(
            name, in_channels=3, image_size=size, num_classes=NUM_CLASSES, ws=True, **options
        )

    model = build()
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert convs and not any(type(m) is nn.Conv2d for m in model.modules())
    used = convs[0]
    w = used.weight.detach()
    var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
    standard = (w - mean) * torch.rsqrt(var + used.eps)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(used(x), nn.functional.conv2d(x, standard, used.bias, padding=1))
    assert choose_grad_sample_mode(model) == "hooks"  # no book-keeping or ew rule applies

    x, y = _batch(3, size)
    wrapped = GradSampleModule(model, loss_reduction="sum", force_functorch=mode == "functorch")
    nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    for i in range(BATCH):  # each example's gradient, alone, through the standardisation
        alone = build()
        nn.functional.cross_entropy(alone(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for (pname, p), (_, q) in zip(
            model.named_parameters(), alone.named_parameters(), strict=True
        ):
            err = _rel_err(p.grad_sample[i], q.grad)
            assert err < REL_TOL, f"{name}/{pname} example {i}: relative error {err:.2e}"
    wrapped._close()
