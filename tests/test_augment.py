"""Augmentation at the site and augmentation multiplicity under DP-SGD.

What must hold: the copies of an example are adjacent, random and seeded; under DP each
example's gradient is the mean of its copies' gradients *before* clipping (so one example still
moves the clipped sum by at most C) and the release is exactly the one of a single copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.data import DataLoader, TensorDataset

from fedcl.client.augment import augment_batch
from fedcl.client.trainer import LocalTrainer
from fedcl.config import FedclError
from fedcl.config.experiment import AugmentSpec, TrainSpec
from fedcl.models import build_model
from fedcl.privacy import DPConfigError, DPHook

pytestmark = pytest.mark.usefixtures("one_torch_thread", "quiet_opacus")
DELTA = 1e-5


def _shifted(img: torch.Tensor, dy: int, dx: int, s: int) -> torch.Tensor:
    """``img`` moved by (dy − s, dx − s) pixels, zeros where nothing moved in."""
    h, w = img.shape[-2:]
    return F.pad(img, (s, s, s, s))[..., dy : dy + h, dx : dx + w]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_copies_are_adjacent_random_shifts_and_rerun_identically() -> None:
    x, y = _images(3), torch.tensor([4, 7, 9])
    spec = AugmentSpec(shift=1, multiplicity=5)
    out, labels = augment_batch(x, y, spec, torch.Generator().manual_seed(0))
    assert out.shape == (15, 1, 8, 8)
    assert labels.tolist() == [4] * 5 + [7] * 5 + [9] * 5
    shifts = set()
    for row in range(15):
        source = x[row // 5]
        match = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(out[row], _shifted(source, dy, dx, 1))
        ]
        assert match, f"row {row} is not a shift of example {row // 5}"
        shifts.add(match[0])
    assert len(shifts) > 3  # random, not one shift for all
    again, _ = augment_batch(x, y, spec, torch.Generator().manual_seed(0))
    other, _ = augment_batch(x, y, spec, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_flips_mirror_some_copies_and_no_transform_is_a_no_op() -> None:
    x, y = _images(1), torch.tensor([2])
    out, _ = augment_batch(x, y, AugmentSpec(flip=True, multiplicity=16), torch.Generator())
    flipped = [torch.equal(r, x[0].flip(-1)) for r in out]
    assert all(f or torch.equal(r, x[0]) for f, r in zip(flipped, out, strict=True))
    assert 0 < sum(flipped) < 16
    same, labels = augment_batch(x, y, AugmentSpec(), torch.Generator())
    assert same is x and labels is y


def test_bad_augmentation_settings_say_which_field() -> None:
    with pytest.raises(ValidationError, match="multiplicity = 4 needs a random transform"):
        TrainSpec(augment={"multiplicity": 4})
    with pytest.raises(FedclError, match=r"train.augment.shift = 8 .*8x8"):
        augment_batch(_images(2), torch.zeros(2), AugmentSpec(shift=8), torch.Generator())
    with pytest.raises(FedclError, match="image batches"):
        augment_batch(torch.zeros(2, 5), torch.zeros(2), AugmentSpec(shift=1), torch.Generator())
    with pytest.raises(DPConfigError, match="cannot average"):
        DPHook(
            noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, grad_sample_mode="bk", augmult=2
        )


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_each_example_is_clipped_as_the_mean_of_its_copies(mode: str) -> None:
    """Opacus' update with K copies = Σᵢ clip(mean_k ∇ℓ(x_ik)) / E[b], computed by hand.

    The clip norm is small enough to bind, so clipping each copy (or the batch) instead of
    each example's mean gives another update: switching the averaging off fails this test.
    """
    k, c, n = 3, 0.05, 24
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    plain = copy.deepcopy(model)
    data = TensorDataset(_images(n), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=8)
    dp = DPHook(
        noise_multiplier=0.0, max_grad_norm=c, delta=DELTA, grad_sample_mode=mode, augmult=k
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, dp_optimizer, dp_loader = dp.setup(model, optimizer, loader)
    x, y = next(x for x in dp_loader if len(x[1]))
    xs, ys = augment_batch(x, y, AugmentSpec(shift=1, multiplicity=k), torch.Generator())
    dp_optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(wrapped(xs), ys).backward()
    assert dp_optimizer.pre_step()

    params = [p for p in plain.parameters()]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        plain.zero_grad()
        F.cross_entropy(plain(xs[i * k : (i + 1) * k]), ys[i * k : (i + 1) * k]).backward()
        g = [p.grad.detach().clone() for p in params]  # the mean over the example's copies
        factor = min(1.0, c / (float(torch.cat([t.reshape(-1) for t in g]).norm()) + 1e-6))
        for e, t in zip(expected, g, strict=True):
            e += factor * t
    for p, e in zip(dp_optimizer.params, expected, strict=True):
        torch.testing.assert_close(
            p.grad, e / dp_optimizer.expected_batch_size, atol=1e-6, rtol=1e-4
        )
    dp.finish(model, type("R", (), {"metrics": {}})())


def test_copies_change_the_update_but_not_the_release() -> None:
    """Same seeds, K = 1 and K = 4: identical mechanism (q, σ, draws), different weights; the
    model's automatic book-keeping mode gives way to one that holds per-sample gradients."""
    n = 40
    data = TensorDataset(_images(n), torch.randint(0, 10, (n,), generator=torch.Generator()))
    releases, weights = [], []
    for spec in (AugmentSpec(shift=1), AugmentSpec(shift=1, multiplicity=4)):
        torch.manual_seed(0)
        model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
        hook = DPHook(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=DELTA,
            noise_seed=3,
            augmult=spec.multiplicity,
        )
        train = TrainSpec(batch_size=10, local_epochs=2, lr=0.5, augment=spec)
        result = LocalTrainer(train, seed=5).fit(model, data, hooks=[hook])
        releases.append((hook.release(), result.steps))
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert hook.grad_sample_mode == ("bk" if spec.multiplicity == 1 else "ew")
    assert releases[0] == releases[1]
    assert not torch.allclose(weights[0], weights[1])
