"""The scattering front end of ``scatter-cnn``: fixed, shared by every site, never sent, and a
filter bank that does what a first-order scattering transform is for (oriented, zero-mean,
per-example)."""

import json
import math

import pytest
import torch
from opacus import PrivacyEngine
from test_simulate_ray import fedcl
from torch import nn

from fedcl.models import build_model, count_parameters
from fedcl.models.scatter import FeatureMemo, J, L, Scattering

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("scatter-cnn", in_channels=3, image_size=32, num_classes=4)


def test_filters_are_fixed_and_never_travel() -> None:
    a, b = _model(0), _model(1)
    # nothing of the front end is in the state dict: no site sends, averages or encrypts it
    assert not any(k.startswith("scattering.") or k.startswith("norm.") for k in a.state_dict())
    assert sum(t.numel() for t in a.state_dict().values()) == count_parameters(a) == 9_812
    # and every site builds the same filters whatever its torch seed
    for (name, fa), (_, fb) in zip(
        a.scattering.named_buffers(), b.scattering.named_buffers(), strict=True
    ):
        assert torch.equal(fa, fb), name
    assert not any(p.requires_grad for p in a.scattering.parameters())


def test_wavelets_have_zero_mean_and_the_low_pass_keeps_a_constant() -> None:
    s = Scattering()
    flat = torch.full((2, 3, 32, 32), 0.7)
    out = s(flat)
    assert out.shape == (2, 3 * (1 + J * L), 8, 8)
    per_colour = out.reshape(2, 3, 1 + J * L, 8, 8)
    torch.testing.assert_close(per_colour[:, :, 0], torch.full((2, 3, 8, 8), 0.7))
    assert per_colour[:, :, 1:].abs().max() < 1e-4  # a flat surface has no edges


def _stripes(angle: float, freq: float, size: int = 32) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return (0.5 + 0.4 * torch.cos(freq * (xx * math.cos(angle) + yy * math.sin(angle))))[None]


@pytest.mark.parametrize("j", range(J))
def test_each_scale_picks_out_one_orientation(j: int) -> None:
    """Stripes at scale j's frequency light up one orientation of that scale; turning them by
    90 degrees moves the peak by L/2 orientations: the features see what way a scratch runs."""
    s = Scattering()
    freq = 3.0 / 4.0 * math.pi / 2**j
    peaks = []
    for angle in (0.0, math.pi / 2):
        energy = s(_stripes(angle, freq)[None])[0, 1 + j * L : 1 + (j + 1) * L].mean(dim=(1, 2))
        assert energy.max() > 5 * energy.min(), energy  # selective, not flat
        peaks.append(int(energy.argmax()))
    assert (peaks[1] - peaks[0]) % L == L // 2


def test_each_example_is_transformed_alone() -> None:
    """DP-SGD's per-example clipping needs each example's features to be its own: the front end
    and its normalisation give example 0 the same features alone as in a batch."""
    model = _model(0)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = model.norm(model.scattering(x[:1]))
        batched = model.norm(model.scattering(x))[:1]
    torch.testing.assert_close(alone, batched)


def test_learns_under_dp_sgd() -> None:
    """Through Opacus (the DP mode chooser's choice included) it learns which way stripes run
    at σ = 1: the wiring from the fixed front end to the trained head is right under DP."""
    gen = torch.Generator().manual_seed(0)
    n = 256
    labels = torch.randint(0, 2, (n,), generator=gen)
    angles = labels.float() * (math.pi / 2) + 0.2 * torch.randn(n, generator=gen)
    freqs = 3.0 / 4.0 * math.pi * (0.6 + 0.8 * torch.rand(n, generator=gen))
    images = torch.stack(
        [_stripes(float(a), float(f)).expand(3, 32, 32) for a, f in zip(angles, freqs, strict=True)]
    )
    images = images + 0.05 * torch.randn(images.shape, generator=gen)
    model = _model(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=64
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(1),
    )
    for _ in range(6):
        for xb, yb in loader:
            if len(xb):
                optimizer.zero_grad()
                nn.functional.cross_entropy(private(xb), yb).backward()
                optimizer.step()
    with torch.no_grad():
        accuracy = (private(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_feature_memo_serves_each_example_its_own_features() -> None:
    """The memo is keyed by the pixels: a reordered batch, a repeated example and a changed
    image all get exactly what the transform computes, and it stays within its byte bound."""
    s = Scattering()
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    row_bytes = 3 * (1 + J * L) * 8 * 8 * 4
    memo = FeatureMemo(max_bytes=5 * row_bytes)
    first = memo(x[:4], s)
    assert (memo.hits, memo.misses) == (0, 4)
    torch.testing.assert_close(first, s(x[:4]), rtol=0, atol=0)
    order = torch.tensor([3, 0, 0, 5])  # reordered, one repeated, one new
    again = memo(x[order], s)
    assert (memo.hits, memo.misses) == (3, 5)
    torch.testing.assert_close(again, s(x[order]), rtol=0, atol=0)
    changed = x[:1].clone()
    changed[0, 0, 0, 0] += 1e-3  # one pixel moved: new key, new features
    torch.testing.assert_close(memo(changed, s), s(changed), rtol=0, atol=0)
    assert memo.misses == 6 and len(memo._rows) == 5  # 6 distinct examples, room for 5
    with torch.no_grad():
        assert torch.equal(memo(x.double(), s.double()), s.double()(x.double()))  # dtype keyed


def test_ewc_fisher_runs_through_the_front_end() -> None:
    """The EWC Fisher takes per-example gradients with ``torch.func`` (vmap over grad), where an
    example is a wrapper without storage: the memo steps aside and the Fisher is the one the
    model gives without any memo (found by a DP EWC run that failed every site at round 5)."""
    from fedcl.continual.fisher import fisher_diagonal
    from fedcl.models import scatter

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    )
    with_memo = fisher_diagonal(_model(0), data, batch_size=4)
    saved, scatter.MEMO.max_bytes = scatter.MEMO.max_bytes, 0
    try:
        without = fisher_diagonal(_model(0), data, batch_size=4)
    finally:
        scatter.MEMO.max_bytes = saved
    assert with_memo.keys() == without.keys() and len(with_memo) == 10
    for name, value in with_memo.items():
        torch.testing.assert_close(value, without[name])
        assert value.abs().sum() > 0, name


@pytest.mark.slow
def test_the_dp_benchmark_model_trains_under_dp_he_ewc_and_only_its_head_travels(
    tmp_path,
) -> None:
    """defects-domain-il-large's `scatter-cnn` under DP-SGD, CKKS and EWC (its DP Fisher goes
    through torch.func, where the feature memo must step aside), shrunk, through the CLI and the
    real apps: every site trains every round, and the encrypted updates carry the 9,812 trained
    parameters, not the fixed filter bank. The in-process engine: the model is the same on any
    engine, Ray's start alone would triple the test (68 s on Ray, 23 s here), and the runtimes
    have tests of their own (tests/test_simulate_ray.py)."""
    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "defects-domain-il-large",
        "--set", "data.options.n_per_class_per_domain=30",
        "--set", "data.num_tasks=2",
        "--set", "train.rounds_per_task=1",
        "--set", "train.local_epochs=1",
        "--set", "simulation.num_sites=3",
        "--set", "dp.epsilon=8",
        "--set", "he.enabled=true",
        "--set", 'continual.method="ewc"',
        "--engine", "inprocess",
        "--out", str(out),
        "--run-id", "scatter",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed", results["reason"]
    assert results["config"]["model"]["name"] == "scatter-cnn"
    assert results["lost_site_rounds"]["total"] == 0
    assert all(r["participants"] == 3 for r in results["rounds"])
    assert [r["kind"] for r in results["rounds"]].count("consolidate") == 1
    for site in results["sites"].values():
        assert 0 < site["epsilon"] <= 8.0 + 1e-6
    assert results["he"]["model_parameters"] == 9_812
    from fedcl.server.registry import Registry

    with Registry.open(f"sqlite:///{out / 'registry.db'}") as reg:
        versions = reg.list_model_versions("scatter")
    assert versions and all(v.encrypted for v in versions)
