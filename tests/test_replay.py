"""Site-local replay buffer: sampling policies, determinism, persistence, validation, and a
Split-Digits class-IL sanity check (replay lifts ACC far above fine-tuning's ~0.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcl.config import ConfigError, FedclError
from fedcl.continual import (
    ReplayBuffer,
    check_replay_policy,
    check_replay_size,
    mixed_dataset,
    summarize,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")


def _stream(n: int, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Example i has input [i] and class i % classes, so the buffer reveals what it kept."""
    idx = torch.arange(n)
    return idx.float().unsqueeze(1), idx % classes


def _kept(buffer: ReplayBuffer) -> list[int]:
    return sorted(int(v) for v in buffer.sample_all()[0].flatten())


# ---- reservoir -------------------------------------------------------------------------------


def test_reservoir_keeps_a_uniform_sample() -> None:
    """Algorithm R: each of N offered examples is kept with probability capacity/N."""
    n, capacity, runs = 1000, 50, 200
    x, y = _stream(n)
    bins = np.zeros(10)
    for seed in range(runs):
        buffer = ReplayBuffer(capacity, "reservoir", seed)
        buffer.add(x, y)
        assert len(buffer) == capacity and buffer.seen == n
        bins += np.bincount(np.array(_kept(buffer)) // (n // 10), minlength=10)
    expected = runs * capacity / 10  # 1000 per tenth of the stream
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, bins  # chi-square, 9 degrees of freedom, p = 0.001
    # early and late examples equally likely (the naive "keep the last" would fail this)
    assert abs(bins[0] - bins[-1]) < 0.15 * expected


def test_reservoir_fills_before_sampling_and_keeps_class_proportions() -> None:
    buffer = ReplayBuffer(10, "reservoir", seed=0)
    x, y = _stream(7)
    buffer.add(x, y)
    assert _kept(buffer) == list(range(7))  # below capacity everything is kept
    big = ReplayBuffer(400, "reservoir", seed=0)
    x = torch.zeros(4000, 1)
    y = torch.cat([torch.zeros(3000, dtype=torch.long), torch.ones(1000, dtype=torch.long)])
    big.add(x, y[torch.randperm(4000, generator=torch.Generator().manual_seed(0))])
    counts = big.class_counts()
    assert counts[0] + counts[1] == 400 and 0.65 < counts[0] / 400 < 0.85


# ---- class-balanced --------------------------------------------------------------------------


def test_class_balanced_gives_equal_quotas_across_tasks() -> None:
    """Class-IL stream (two new classes per task): the quota shrinks as classes arrive."""
    buffer = ReplayBuffer(20, "class-balanced", seed=0)
    for task in range(5):
        for c in (2 * task, 2 * task + 1):
            buffer.add(torch.full((60, 1), float(c)), torch.full((60,), c))
        counts = buffer.class_counts()
        classes = 2 * (task + 1)
        assert sorted(counts) == list(range(classes))
        assert sum(counts.values()) == 20
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    # the stored inputs really belong to their labels
    x, y = buffer.sample_all()
    assert torch.equal(x.flatten().long(), y)


def test_class_balanced_keeps_minority_classes_whole() -> None:
    buffer = ReplayBuffer(30, "class-balanced", seed=1)
    y = torch.cat([torch.zeros(500, dtype=torch.long), torch.full((6,), 1), torch.full((8,), 2)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    buffer.add(torch.arange(len(y)).float().unsqueeze(1), y)
    assert buffer.class_counts() == {0: 16, 1: 6, 2: 8}
    reservoir = ReplayBuffer(30, "reservoir", seed=1)
    reservoir.add(torch.arange(len(y)).float().unsqueeze(1), y)
    assert reservoir.class_counts().get(1, 0) < 6  # what the balanced policy protects against


def test_class_balanced_is_uniform_within_a_class() -> None:
    n, runs = 600, 100
    first_half = 0
    for seed in range(runs):
        buffer = ReplayBuffer(20, "class-balanced", seed)
        buffer.add(torch.arange(n).float().unsqueeze(1), torch.arange(n) % 2)
        first_half += sum(1 for v in _kept(buffer) if v < n // 2)
    assert 0.45 < first_half / (runs * 20) < 0.55


# ---- determinism and persistence -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_same_seed_same_buffer(policy: str) -> None:
    x, y = _stream(500)
    a, b, c = (ReplayBuffer(40, policy, s) for s in (3, 3, 4))
    for buffer in (a, b, c):
        buffer.add(x[:200], y[:200])
        buffer.add(x[200:], y[200:])  # batching does not matter, only the order
    one_go = ReplayBuffer(40, policy, 3)
    one_go.add(x, y)
    assert _kept(a) == _kept(b) == _kept(one_go)
    assert torch.equal(a.sample_all()[1], b.sample_all()[1])
    assert _kept(a) != _kept(c)


@pytest.mark.parametrize("policy", ["reservoir", "class-balanced"])
def test_save_load_round_trip_continues_the_same_sequence(tmp_path, policy: str) -> None:
    x, y = _stream(600, classes=3)
    buffer = ReplayBuffer(30, policy, seed=5)
    assert buffer.add_dataset(TensorDataset(x[:300], y[:300]), batch_size=64, tag="task-0")
    assert not buffer.add_dataset(TensorDataset(x[:300], y[:300]), tag="task-0")  # retried
    path = buffer.save(tmp_path / "site" / "replay.safetensors")
    loaded = ReplayBuffer.load(path)
    assert (loaded.capacity, loaded.policy, loaded.seed, loaded.seen) == (30, policy, 5, 300)
    assert torch.equal(loaded.sample_all()[0], buffer.sample_all()[0])
    assert torch.equal(loaded.sample_all()[1], buffer.sample_all()[1])
    assert loaded.seen_per_class() == buffer.seen_per_class()
    assert loaded.tags == buffer.tags == ["task-0"]
    # a restarted site draws the same random numbers as one that never stopped
    buffer.add(x[300:], y[300:])
    loaded.add(x[300:], y[300:])
    assert torch.equal(loaded.sample_all()[0], buffer.sample_all()[0])


def test_empty_buffer_round_trip_and_bad_files(tmp_path) -> None:
    empty = ReplayBuffer(5, "class-balanced", seed=2)
    loaded = ReplayBuffer.load(empty.save(tmp_path / "empty.safetensors"))
    assert len(loaded) == 0 and loaded.policy == "class-balanced"
    x, y = loaded.sample_all()
    assert x.numel() == 0 and y.numel() == 0
    with pytest.raises(FedclError, match="does not exist"):
        ReplayBuffer.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FedclError, match="cannot be read"):
        ReplayBuffer.load(tmp_path / "junk.safetensors")


def test_inputs_of_another_shape_are_rejected() -> None:
    buffer = ReplayBuffer(5)
    buffer.add(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(FedclError, match="dataset changed"):
        buffer.add(torch.zeros(1, 4), torch.tensor([0]))
    with pytest.raises(FedclError, match="targets"):
        buffer.add(torch.zeros(2, 3), torch.tensor([0]))
    buffer.add(torch.zeros(3), 2)  # one example with a scalar target
    assert len(buffer) == 3


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True])
def test_bad_capacity_names_the_field(capacity) -> None:
    with pytest.raises(ConfigError, match="continual.replay_size"):
        ReplayBuffer(capacity)  # type: ignore[arg-type]


def test_capacity_larger_than_site_data_is_a_config_error() -> None:
    check_replay_size(300, 300, "site-a")
    with pytest.raises(ConfigError, match="continual.replay_size") as err:
        check_replay_size(500, 300, "site-a")
    assert "site-a" in str(err.value) and "300" in str(err.value)
    with pytest.raises(ConfigError, match="continual.replay_size"):
        check_replay_size(0, 300, "site-a")


def test_bad_policy_names_the_field() -> None:
    assert check_replay_policy("reservoir") == "reservoir"
    with pytest.raises(ConfigError, match="continual.replay_policy"):
        ReplayBuffer(10, "fifo")


# ---- mixing ----------------------------------------------------------------------------------


def test_mixed_dataset_concatenates_task_and_buffer() -> None:
    task = TensorDataset(torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,)))
    buffer = ReplayBuffer(5, seed=0)
    assert mixed_dataset(task, buffer) is task  # empty buffer: the task alone
    buffer.add_dataset(TensorDataset(torch.randn(9, 1, 8, 8), torch.randint(0, 10, (9,))))
    mixed = mixed_dataset(task, buffer)
    assert len(mixed) == 12 + 5  # N for DP sampling and the FedAvg weight
    x, y = next(iter(DataLoader(mixed, batch_size=len(mixed))))
    assert x.shape == (17, 1, 8, 8) and y.dtype == torch.long
    other = TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FedclError, match="another dataset"):
        mixed_dataset(other, buffer)


def test_mixed_dataset_sets_the_dp_sample_rate() -> None:
    """Opacus' Poisson loader samples from all N = task + buffer examples."""
    from opacus.data_loader import DPDataLoader

    task = TensorDataset(torch.randn(90, 4), torch.zeros(90, dtype=torch.long))
    buffer = ReplayBuffer(30, seed=0)
    buffer.add(torch.randn(50, 4), torch.ones(50, dtype=torch.long))
    loader = DPDataLoader.from_data_loader(DataLoader(mixed_dataset(task, buffer), batch_size=12))
    assert loader.sample_rate == pytest.approx(12 / 120)


# ---- centralised sanity check: Split-Digits class-IL -----------------------------------------


def _class_il_run(replay_size: int, seed: int) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedcl.client.trainer import LocalTrainer, evaluate
    from fedcl.config.experiment import TrainSpec

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    train = [TensorDataset(xtr[ytr // 2 == t], ytr[ytr // 2 == t]) for t in range(5)]
    test = [TensorDataset(xte[yte // 2 == t], yte[yte // 2 == t]) for t in range(5)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    trainer = LocalTrainer(TrainSpec(local_epochs=5, batch_size=32, lr=0.05), seed=seed)
    buffer = ReplayBuffer(replay_size, "class-balanced", seed) if replay_size else None
    matrix = []
    for t in range(5):
        trainer.fit(model, mixed_dataset(train[t], buffer) if buffer is not None else train[t])
        if buffer is not None:
            buffer.add_dataset(train[t])  # at the task's end, as a site does
        matrix.append([c / n for c, n, _ in (evaluate(model, d) for d in test)])
    return summarize(matrix)


def test_replay_lifts_class_il_accuracy_on_split_digits() -> None:
    naive = _class_il_run(0, seed=0)
    replay = [_class_il_run(200, seed=s) for s in (0, 1)]
    print(f"class-IL naive {naive} replay {replay}")
    assert naive["avg_accuracy"] < 0.3  # fine-tuning forgets every earlier pair
    assert min(r["avg_accuracy"] for r in replay) > 0.6
