"""EWC (memory, hook), Fisher diagonals (exact and DP) and a Split-Digits sanity check.

The central claim under test: the EWC penalty reaches the update exactly once, as
``−lr·λ·F·(θ − θ*)``, in every Opacus grad-sample mode, because it is added after
privatisation; while the naive alternative (the penalty in the loss) is dropped (opacus#249).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fedcl.config import ConfigError, FedclError
from fedcl.continual import (
    EWCHook,
    EWCMemory,
    check_ewc_settings,
    dp_fisher_diagonal,
    fisher_diagonal,
    fisher_from_sum,
    fisher_share,
    parameter_dict,
    summarize,
)

torch.set_num_threads(1)
# Opacus' expected chatter: no secure RNG in tests; full backward hooks on input-less layers.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

LR, LAM = 0.1, 2.0
DP_MODES = ["hooks", "ew", "functorch", "ghost"]


def _small_model(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, outputs))


def _data(n: int = 16, seed: int = 1, outputs: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 6, generator=g), torch.randint(0, outputs, (n,), generator=g)
    )


def _memory(model: nn.Module, seed: int = 2) -> EWCMemory:
    """A memory whose anchor is away from the model, so the penalty gradient is large."""
    g = torch.Generator().manual_seed(seed)
    theta = parameter_dict(model)
    fisher = {n: torch.rand(t.shape, generator=g) for n, t in theta.items()}
    anchor = {n: t + 0.5 * torch.randn(t.shape, generator=g) for n, t in theta.items()}
    memory = EWCMemory()
    memory.consolidate(fisher, anchor, gamma=1.0, tag="task-0")
    return memory


def _expected_delta(model: nn.Module, memory: EWCMemory) -> dict[str, torch.Tensor]:
    theta = parameter_dict(model)
    return {n: -LR * LAM * memory.fisher[n] * (theta[n] - memory.anchor[n]) for n in memory.names()}


def _one_dp_step(
    base: nn.Module,
    data: TensorDataset,
    mode: str,
    *,
    hook: EWCHook | None = None,
    penalty_in_loss: EWCMemory | None = None,
    max_grad_norm: float = 0.5,
    noise_multiplier: float = 1.0,
) -> dict[str, torch.Tensor]:
    """One DP-SGD step on a copy of ``base``, the trainer's way: pre_step, hooks, then step.

    Clipping is active and noise is on; the noise generator is seeded, so two calls differ only
    by what the hook (or the loss term) contributes.
    """
    from opacus import PrivacyEngine

    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(data, batch_size=len(data))
    criterion = nn.CrossEntropyLoss()
    out = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(7),
    )
    if mode == "ghost":
        model, optimizer, criterion, loader = out
    else:
        model, optimizer, loader = out
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        if penalty_in_loss is not None:
            loss = loss + _penalty_term(model, penalty_in_loss)
        loss.backward()
        if optimizer.pre_step():
            if hook is not None:
                hook.add_gradients(model)
            optimizer.original_optimizer.step()
    return parameter_dict(model)


def _penalty_term(model: nn.Module, memory: EWCMemory) -> torch.Tensor:
    """The naive EWC: (λ/2)·Σ F·(θ − θ*)² added to the loss (differentiable)."""
    total = torch.zeros(())
    for name, p in model.named_parameters():
        key = name.removeprefix("_module.")
        total = total + (memory.fisher[key] * (p - memory.anchor[key]) ** 2).sum()
    return total * (LAM / 2)


def _max_err(a: dict, b: dict, expected: dict) -> float:
    return max(float((b[n] - a[n] - expected[n]).abs().max()) for n in expected)


# ---- the penalty in the update ---------------------------------------------------------------


@pytest.mark.parametrize("mode", DP_MODES)
def test_hook_adds_exact_penalty_under_dp(mode: str) -> None:
    base, data = _small_model(), _data()
    memory = _memory(base)
    without = _one_dp_step(base, data, mode)
    with_hook = _one_dp_step(base, data, mode, hook=EWCHook(memory, LAM))
    expected = _expected_delta(base, memory)
    assert max(float(v.abs().max()) for v in expected.values()) > 0.05  # not a vacuous check
    assert _max_err(without, with_hook, expected) < 1e-5


def test_hook_adds_exact_penalty_without_dp_through_trainer() -> None:
    from fedcl.client.trainer import LocalTrainer
    from fedcl.config.experiment import TrainSpec

    base, data = _small_model(), _data()
    memory = _memory(base)
    spec = TrainSpec(local_epochs=1, batch_size=len(data), lr=LR, momentum=0.0)
    runs = []
    for hooks in ([], [EWCHook(memory, LAM)]):
        model = copy.deepcopy(base)
        result = LocalTrainer(spec, seed=0).fit(model, data, hooks=hooks)
        runs.append(parameter_dict(model))
    assert result.steps == 1 and "ewc_penalty" in result.metrics
    assert result.metrics["ewc_max_curvature"] == pytest.approx(
        LAM * max(float(f.max()) for f in memory.fisher.values())
    )
    assert _max_err(runs[0], runs[1], _expected_delta(base, memory)) < 1e-5


class _OpacusHook:
    """Test-only DP hook: what the privacy feature's hook does in ``setup``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def setup(self, model, optimizer, loader):
        from opacus import PrivacyEngine

        return PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            poisson_sampling=False,
            grad_sample_mode=self.mode,
            noise_generator=torch.Generator().manual_seed(7),
        )

    def add_gradients(self, model):
        return None

    def finish(self, model, result):
        return None


def test_hook_adds_exact_penalty_under_dp_through_trainer() -> None:
    from fedcl.client.trainer import LocalTrainer
    from fedcl.config.experiment import TrainSpec

    base, data = _small_model(), _data()
    memory = _memory(base)
    spec = TrainSpec(local_epochs=1, batch_size=len(data), lr=LR, momentum=0.0)
    runs = []
    for extra in ([], [EWCHook(memory, LAM)]):
        model = copy.deepcopy(base)
        LocalTrainer(spec, seed=0).fit(model, data, hooks=[_OpacusHook("hooks"), *extra])
        runs.append(parameter_dict(model))  # names without Opacus' "_module." prefix
    assert _max_err(runs[0], runs[1], _expected_delta(base, memory)) < 1e-5


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_penalty_in_loss_is_dropped_by_opacus(mode: str) -> None:
    """opacus#249: per-sample gradients cover the data loss only; the loss term vanishes."""
    base, data = _small_model(), _data()
    memory = _memory(base)
    without = _one_dp_step(base, data, mode)
    in_loss = _one_dp_step(base, data, mode, penalty_in_loss=memory)
    assert max(float((in_loss[n] - without[n]).abs().max()) for n in without) < 1e-7


def test_penalty_in_loss_is_distorted_by_ghost_clipping() -> None:
    """Ghost clipping keeps the loss term but scales it: the update is not −lr·λ·F·(θ − θ*)."""
    base, data = _small_model(), _data()
    memory = _memory(base)
    without = _one_dp_step(base, data, "ghost")
    in_loss = _one_dp_step(base, data, "ghost", penalty_in_loss=memory)
    assert _max_err(without, in_loss, _expected_delta(base, memory)) > 1e-2


def test_hook_is_noop_on_empty_memory_and_zero_lambda() -> None:
    model, data = _small_model(), _data()
    nn.CrossEntropyLoss()(model(data.tensors[0]), data.tensors[1]).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    EWCHook(EWCMemory(), LAM).add_gradients(model)
    EWCHook(_memory(model), 0.0).add_gradients(model)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])


def test_hook_rejects_memory_of_another_model() -> None:
    memory = _memory(_small_model())
    narrower = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    deeper = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Linear(5, 3))
    for other, message in ((narrower, "differs from the model's"), (deeper, "does not match")):
        other(torch.zeros(1, 6)).sum().backward()
        with pytest.raises(FedclError, match=message):
            EWCHook(memory, LAM).add_gradients(other)


# ---- memory ----------------------------------------------------------------------------------


def test_online_consolidation_math() -> None:
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.rand(3, 2, generator=g), torch.rand(3, 2, generator=g)
    t1, t2 = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    memory = EWCMemory()
    assert memory.is_empty
    memory.consolidate({"w": f1}, {"w": t1}, gamma=0.5)
    assert torch.equal(memory.fisher["w"], f1) and torch.equal(memory.anchor["w"], t1)
    memory.consolidate({"w": f2}, {"w": t2}, gamma=0.5)
    assert torch.allclose(memory.fisher["w"], 0.5 * f1 + f2)
    assert torch.equal(memory.anchor["w"], t2)
    assert memory.consolidations == 2
    # a retried consolidation with the same tag is a no-op
    assert memory.consolidate({"w": f2}, {"w": t2}, gamma=0.5, tag="run/task-1") is True
    once = memory.fisher["w"].clone()
    assert memory.consolidate({"w": f2}, {"w": t2}, gamma=0.5, tag="run/task-1") is False
    assert torch.equal(memory.fisher["w"], once) and memory.tags == ["run/task-1"]
    # penalty value: (λ/2)·Σ F·(θ − θ*)²
    model = nn.Linear(2, 3, bias=False)
    memory2 = EWCMemory({"weight": f1}, {"weight": t1})
    d = model.weight.detach() - t1
    assert float(memory2.penalty(model, 4.0)) == pytest.approx(float(2.0 * (f1 * d * d).sum()))


def test_consolidate_rejects_mismatch_and_negative_fisher() -> None:
    memory = EWCMemory({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    with pytest.raises(FedclError, match="other parameters"):
        memory.consolidate({"v": torch.ones(2)}, {"v": torch.zeros(2)})
    with pytest.raises(FedclError, match="shape"):
        memory.consolidate({"w": torch.ones(3)}, {"w": torch.zeros(3)})
    with pytest.raises(FedclError, match="negative"):
        memory.consolidate({"w": -torch.ones(2)}, {"w": torch.zeros(2)})
    with pytest.raises(FedclError, match="same parameters"):
        memory.consolidate({"w": torch.ones(2)}, {"v": torch.zeros(2)})


def test_consolidate_strips_wrapper_prefixes() -> None:
    from opacus import GradSampleModule

    model = _small_model()
    wrapped = GradSampleModule(copy.deepcopy(model))
    memory = EWCMemory()
    data = _data()
    memory.consolidate(fisher_diagonal(wrapped, data), wrapped)
    assert memory.names() == sorted(n for n, _ in model.named_parameters())
    # Opacus' hooks were suspended for the Fisher only: per-sample gradients still work.
    nn.CrossEntropyLoss()(wrapped(data.tensors[0]), data.tensors[1]).backward()
    assert all(p.grad_sample.shape[0] == len(data) for p in wrapped.parameters())


def test_digest_survives_save_load_and_detects_changes(tmp_path) -> None:
    memory = _memory(_small_model())
    path = memory.save(tmp_path / "state" / "ewc.safetensors")
    loaded = EWCMemory.load(path)
    assert loaded.digest() == memory.digest()
    assert loaded.consolidations == memory.consolidations and loaded.tags == memory.tags
    assert loaded.names() == memory.names()
    other = EWCMemory(memory.fisher, memory.anchor)
    name = other.names()[0]
    other.fisher[name] = other.fisher[name].clone()
    other.fisher[name].view(-1)[0] += 1e-6
    assert other.digest() != memory.digest()
    assert EWCMemory.load(tmp_path / "missing.safetensors", missing_ok=True).is_empty
    with pytest.raises(FedclError, match="does not exist"):
        EWCMemory.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FedclError, match="cannot be read"):
        EWCMemory.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    ("lam", "gamma", "field"),
    [
        (-1.0, 1.0, "continual.ewc_lambda"),
        (float("nan"), 1.0, "continual.ewc_lambda"),
        (1.0, 0.0, "continual.ewc_gamma"),
        (1.0, 1.5, "continual.ewc_gamma"),
        (1.0, -0.1, "continual.ewc_gamma"),
    ],
)
def test_bad_settings_name_the_field(lam: float, gamma: float, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        check_ewc_settings(lam, gamma)


def test_good_settings_pass() -> None:
    check_ewc_settings(0.0, 1.0)
    check_ewc_settings(100.0, 0.9)
    with pytest.raises(ConfigError, match="continual.ewc_lambda"):
        EWCHook(EWCMemory(), -2.0)


# ---- Fisher ----------------------------------------------------------------------------------


def _brute_force_grads(model: nn.Module, data: TensorDataset, mask=None) -> list[dict]:
    grads = []
    for x, y in zip(*data.tensors, strict=True):
        model.zero_grad()
        logits = model(x.unsqueeze(0))
        if mask is not None:
            keep = torch.full((logits.shape[-1],), float("-inf"))
            keep[list(mask)] = 0.0
            logits = logits + keep
        nn.functional.cross_entropy(logits, y.unsqueeze(0)).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return grads


@pytest.mark.parametrize("mask", [None, (0, 2)])
def test_fisher_is_mean_of_squared_per_sample_grads(mask) -> None:
    model = _small_model()
    data = _data(n=23)
    if mask is not None:
        data = TensorDataset(data.tensors[0], torch.where(data.tensors[1] == 1, 0, 2))
    grads = _brute_force_grads(model, data, mask)
    brute = {n: torch.stack([g[n] ** 2 for g in grads]).mean(0) for n in grads[0]}
    squared_mean = {n: torch.stack([g[n] for g in grads]).mean(0) ** 2 for n in grads[0]}
    fisher = fisher_diagonal(model, data, output_mask=mask, batch_size=5)  # uneven batches
    assert set(fisher) == set(brute)
    for n in brute:
        assert torch.allclose(fisher[n], brute[n], atol=1e-6, rtol=1e-4)
    total_f = sum(float(v.sum()) for v in fisher.values())
    total_sq = sum(float(v.sum()) for v in squared_mean.values())
    assert total_sq < 0.8 * total_f  # the squared mean gradient is another (smaller) quantity


def test_fisher_max_examples_and_training_flag() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    a = fisher_diagonal(model, _data(n=30), max_examples=10, seed=3)
    b = fisher_diagonal(model, _data(n=30), max_examples=10, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)  # eval mode: dropout off, deterministic
    assert model.training


def _clipped_brute(model, data, clip):
    grads = _brute_force_grads(model, data)
    out = {n: torch.zeros_like(grads[0][n]) for n in grads[0]}
    clipped = 0
    for g in grads:
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped += factor < 1
        for n, v in g.items():
            out[n] += (v * factor) ** 2
    return {n: v / len(grads) for n, v in out.items()}, clipped


def test_dp_fisher_without_noise_is_the_clipped_fisher() -> None:
    model, data = _small_model(), _data(n=40)
    norms = [
        float(torch.sqrt(sum((v**2).sum() for v in g.values())))
        for g in _brute_force_grads(model, data)
    ]
    clip = float(np.median(norms))  # clipping active for half of the examples
    expected, clipped = _clipped_brute(model, data, clip=clip)
    assert 0 < clipped < 40
    fisher, release = dp_fisher_diagonal(
        model, data, clip_norm=clip, noise_multiplier=0.0, generator=torch.Generator()
    )
    for n in expected:
        assert torch.allclose(fisher[n], expected[n], atol=1e-6, rtol=1e-4)
    assert release.mechanism == "fisher" and release.sample_rate == 1.0 and release.steps == 1
    assert release.sensitivity == pytest.approx(clip**2) and release.num_examples == 40


@pytest.mark.parametrize("squared_clip", [None, 0.05])
def test_dp_fisher_noise_has_the_stated_scale(squared_clip) -> None:
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))  # 754 coordinates
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(50, 20, generator=g), torch.randint(0, 4, (50,), generator=g))
    kwargs = {"clip_norm": 0.7, "squared_clip_norm": squared_clip, "clamp": False}
    clean, _ = dp_fisher_diagonal(model, data, noise_multiplier=0.0, **kwargs)
    noisy, release = dp_fisher_diagonal(
        model, data, noise_multiplier=2.0, generator=torch.Generator().manual_seed(1), **kwargs
    )
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    sensitivity = 0.49 if squared_clip is None else 0.05
    assert release.sensitivity == pytest.approx(sensitivity)
    assert release.noise_multiplier == 2.0
    expected_std = 2.0 * sensitivity / 50
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.1)
    assert abs(float(noise.mean())) < 4 * expected_std / noise.numel() ** 0.5
    clamped, _ = dp_fisher_diagonal(
        model, data, clip_norm=0.7, noise_multiplier=2.0, generator=torch.Generator()
    )
    assert all(bool((v >= 0).all()) for v in clamped.values())


def test_dp_fisher_settings_name_the_field() -> None:
    model, data = _small_model(), _data()
    with pytest.raises(ConfigError, match="continual.fisher_clip_norm"):
        dp_fisher_diagonal(model, data, clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="continual.fisher_noise_multiplier"):
        dp_fisher_diagonal(model, data, clip_norm=1.0, noise_multiplier=-1.0)


def test_federated_weighting_equals_pooled_fisher() -> None:
    """Σ F_s·n_s / Σ n_s over sites is the Fisher of the pooled data."""
    model = _small_model()
    sites = [_data(n=7, seed=10), _data(n=19, seed=11), _data(n=4, seed=12)]
    shares = [fisher_share(fisher_diagonal(model, d), len(d)) for d in sites]
    summed = {n: sum(s[n] for s in shares) for n in shares[0]}
    federated = fisher_from_sum(summed, sum(len(d) for d in sites))
    pooled = fisher_diagonal(model, ConcatDataset(sites))
    for n in pooled:
        assert torch.allclose(federated[n], pooled[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(FedclError):
        fisher_from_sum(summed, 0)


def test_sites_get_identical_memories_from_the_same_aggregate(tmp_path) -> None:
    model = _small_model()
    summed = fisher_share(fisher_diagonal(model, _data(n=12)), 12)
    digests = []
    for site in ("a", "b"):
        memory = EWCMemory()
        memory.consolidate(fisher_from_sum(summed, 12), model, gamma=0.9)
        digests.append(EWCMemory.load(memory.save(tmp_path / site / "ewc.safetensors")).digest())
    assert digests[0] == digests[1]


# ---- centralised sanity check: Split-Digits domain-IL ----------------------------------------


def _split_digits(domain_il: bool):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    def task(xs, ys, t):
        m = (ys // 2) == t
        return TensorDataset(xs[m], ys[m] % 2 if domain_il else ys[m])

    return [task(xtr, ytr, t) for t in range(5)], [task(xte, yte, t) for t in range(5)]


def run_split_digits(
    method: str, *, seed: int, domain_il: bool, lam: float = 100.0, replay_size: int = 200
) -> dict:
    """Five tasks, a small MLP, the site trainer; returns ACC/BWT (used by test_replay too)."""
    from fedcl.client.trainer import LocalTrainer, evaluate
    from fedcl.config.experiment import TrainSpec
    from fedcl.continual import ReplayBuffer, mixed_dataset

    train, test = _split_digits(domain_il)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2 if domain_il else 10))
    spec = TrainSpec(local_epochs=5, batch_size=32, lr=0.05, momentum=0.9)
    trainer = LocalTrainer(spec, seed=seed)
    memory = EWCMemory()
    buffer = ReplayBuffer(replay_size, "reservoir", seed) if method == "replay" else None
    matrix = []
    for t in range(5):
        data = mixed_dataset(train[t], buffer) if buffer is not None else train[t]
        hooks = [EWCHook(memory, lam)] if method == "ewc" else []
        trainer.fit(model, data, hooks=hooks)
        if method == "ewc":
            memory.consolidate(fisher_diagonal(model, train[t], batch_size=256), model, 1.0)
        if buffer is not None:
            buffer.add_dataset(train[t])
        row = []
        for j in range(5):
            correct, count, _ = evaluate(model, test[j])
            row.append(correct / count)
        matrix.append(row)
    return summarize(matrix)


def test_ewc_reduces_forgetting_on_split_digits_domain_il() -> None:
    naive, ewc = [], []
    for seed in (0, 1):
        naive.append(run_split_digits("naive", seed=seed, domain_il=True))
        ewc.append(run_split_digits("ewc", seed=seed, domain_il=True))
    naive_bwt = float(np.mean([r["bwt"] for r in naive]))
    ewc_bwt = float(np.mean([r["bwt"] for r in ewc]))
    print(f"domain-IL naive {naive} ewc {ewc}")
    assert ewc_bwt > naive_bwt + 0.03
    assert np.mean([r["avg_accuracy"] for r in ewc]) > np.mean([r["avg_accuracy"] for r in naive])
