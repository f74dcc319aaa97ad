"""Keyed bottom-k replay membership (issue 11, item 6): one example moves at most one slot.

The buffer is a function of (the multiset of examples, the key, capacity, policy), so it is
checked here against that definition directly, over many random removals and additions, for
both policies; plus determinism, the site's key file, persistence and a site that missed a task.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from fedcl.config import FedclError
from fedcl.continual.replay import ReplayBuffer, ReplayBufferMismatch
from fedcl.continual.replay_keys import KEY_FILE, load_or_create_key

torch.set_num_threads(1)
POLICIES = ["reservoir", "class-balanced"]


def _contents(buffer: ReplayBuffer) -> Counter:
    """The buffer as a multiset of (input bytes, target)."""
    x, y = buffer.sample_all()
    return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))


def _sym_diff(a: Counter, b: Counter) -> int:
    return sum(((a - b) + (b - a)).values())


def _data(gen: torch.Generator, n: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uneven class sizes (some classes below their quota) and some exact duplicates."""
    weights = torch.linspace(1.0, 12.0, classes)
    y = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=gen)
    x = torch.randint(0, 40, (n, 2), generator=gen).float()  # collisions: duplicate examples
    return x, y


def _built(x, y, capacity: int, policy: str, key: bytes) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, policy, key=key)
    buffer.add(x, y)
    return buffer


def _reference(buffer: ReplayBuffer, x: torch.Tensor, y: torch.Tensor) -> Counter:
    """The buffer by its definition: bottom-k of the keyed scores (of the virtual keys)."""
    header, rows = buffer._rows(x)
    copies: Counter = Counter()
    scored = []
    for i, yi in enumerate(y.tolist()):
        content = buffer._content_id(header, rows[i].tobytes(), yi)
        scored.append((buffer._score(content, copies[content]), x[i].numpy().tobytes(), yi))
        copies[content] += 1
    scored.sort()
    if buffer.policy == "reservoir":
        return Counter((xb, yi) for _, xb, yi in scored[: buffer.capacity])
    per_class: dict[int, list] = {}
    for item in scored:
        per_class.setdefault(item[2], []).append(item)
    virtual = sorted(
        (r, buffer._class_priority(c), c)
        for c, items in per_class.items()
        for r in range(len(items))
    )[: buffer.capacity]
    quota = Counter(c for _, _, c in virtual)
    return Counter((xb, yi) for c, items in per_class.items() for _, xb, yi in items[: quota[c]])


# ---- the one-slot property ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_removing_or_adding_one_example_changes_at_most_one_slot(policy: str) -> None:
    gen = torch.Generator().manual_seed(11)
    changed = 0
    for trial in range(120):
        n, classes = int(torch.randint(60, 260, (1,), generator=gen)), 2 + trial % 7
        capacity = int(torch.randint(5, 50, (1,), generator=gen))
        key = os.urandom(32)
        x, y = _data(gen, n, classes)
        full = _built(x, y, capacity, policy, key)
        assert _contents(full) == _reference(full, x, y)
        assert len(full) == min(capacity, n)
        drop = int(torch.randint(0, n, (1,), generator=gen))
        keep = torch.arange(n) != drop
        without = _built(x[keep], y[keep], capacity, policy, key)
        assert _contents(without) == _reference(without, x[keep], y[keep])
        diff = _sym_diff(_contents(full), _contents(without))
        # one slot: at most the removed example out and one other example in
        assert diff <= 2, (trial, diff)
        assert sum((_contents(without) - _contents(full)).values()) <= 1
        removed = _contents(full) - _contents(without)
        assert set(removed) <= {(x[drop].numpy().tobytes(), int(y[drop]))}
        changed += diff > 0
        # adding a fresh example (perhaps of a new class) is the same statement backwards
        new_x = torch.randint(0, 40, (1, 2), generator=gen).float()
        new_y = torch.randint(0, classes + 1, (1,), generator=gen)
        more = _built(torch.cat([x, new_x]), torch.cat([y, new_y]), capacity, policy, key)
        assert _sym_diff(_contents(full), _contents(more)) <= 2
        assert sum((_contents(full) - _contents(more)).values()) <= 1
        assert set(_contents(more) - _contents(full)) <= {(new_x[0].numpy().tobytes(), int(new_y))}
    assert changed > 10  # the removals did reach the buffer


def test_class_balanced_quotas_move_by_one_slot_when_a_whole_class_loses_an_example() -> None:
    """A minority class kept whole: removing one of its examples frees a slot for another."""
    key = b"k" * 32
    y = torch.tensor([0] * 50 + [1] * 4 + [2] * 50)
    x = torch.arange(len(y)).float().unsqueeze(1)
    full = _built(x, y, 20, "class-balanced", key)
    assert full.class_counts()[1] == 4 and sum(full.class_counts().values()) == 20
    keep = torch.arange(len(y)) != 51
    without = _built(x[keep], y[keep], 20, "class-balanced", key)
    counts = without.class_counts()
    assert counts[1] == 3 and sum(counts.values()) == 20
    assert _sym_diff(_contents(full), _contents(without)) == 2


# ---- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_the_buffer_depends_on_the_key_and_the_examples_only(policy: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = _data(gen, 400, 6)
    key = os.urandom(32)
    one_go = _built(x, y, 30, policy, key)
    perm = torch.randperm(400, generator=gen)
    shuffled = ReplayBuffer(30, policy, key=key)
    for part in torch.split(perm, 37):  # another order, other batches
        shuffled.add(x[part], y[part])
    assert _contents(one_go) == _contents(shuffled)
    assert torch.equal(one_go.sample_all()[0], shuffled.sample_all()[0])  # same slot order too
    other = _built(x, y, 30, policy, os.urandom(32))
    assert _contents(other) != _contents(one_go)


def test_keyed_buffer_round_trip_and_wrong_key(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = _data(gen, 300, 4)
    key = os.urandom(32)
    buffer = _built(x[:200], y[:200], 25, "class-balanced", key)
    path = buffer.save(tmp_path / "replay.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # raw examples of the site
    assert key not in path.read_bytes()
    loaded = ReplayBuffer.load(path, key=key)
    assert loaded.keyed and loaded.seed is None and loaded.key_id == buffer.key_id
    assert _contents(loaded) == _contents(buffer)
    loaded.add(x[200:], y[200:])
    assert _contents(loaded) == _contents(_built(x, y, 25, "class-balanced", key))
    with pytest.raises(ReplayBufferMismatch, match="another key"):
        ReplayBuffer.load(path, key=os.urandom(32))
    with pytest.raises(FedclError, match="replay key"):
        ReplayBuffer.load(path)


def test_a_tampered_buffer_file_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = os.urandom(32)
    buffer = _built(torch.arange(40.0).unsqueeze(1), torch.arange(40) % 4, 8, "reservoir", key)
    path = buffer.save(tmp_path / "replay.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["x"] = tensors["x"] + 1000.0  # examples the site never saw
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FedclError, match="never seen"):
        ReplayBuffer.load(path, key=key)


# ---- the site's key -----------------------------------------------------------------------------


def test_key_file_is_created_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        key = load_or_create_key(tmp_path / "state")
    finally:
        os.umask(old)
    path = tmp_path / "state" / KEY_FILE
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    inode = path.stat().st_ino
    assert load_or_create_key(tmp_path / "state") == key
    assert path.stat().st_ino == inode
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary left


def test_concurrent_first_messages_agree_on_one_key(tmp_path: Path) -> None:
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def first_message() -> None:
        barrier.wait()
        keys.append(load_or_create_key(tmp_path))

    threads = [threading.Thread(target=first_message) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE]


def test_a_readable_or_damaged_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    load_or_create_key(tmp_path)
    path.chmod(0o644)
    with pytest.raises(FedclError, match="chmod 600"):
        load_or_create_key(tmp_path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(FedclError, match="damaged"):
        load_or_create_key(tmp_path)


# ---- the site: refilled from its own data, a missed task still replayed -------------------------


def _job(state: Path, tasks: list[TensorDataset], task_index: int, **continual) -> SimpleNamespace:
    spec = SimpleNamespace(
        replay_size=continual.get("replay_size", 12),
        replay_policy=continual.get("replay_policy", "class-balanced"),
        method=continual.get("method", "replay"),
    )
    run = state / "runs" / "run-1"
    run.mkdir(parents=True, exist_ok=True)
    total = sum(len(t) for t in tasks)
    return SimpleNamespace(
        experiment=SimpleNamespace(continual=spec, is_joint=continual.get("joint", False)),
        data=SimpleNamespace(train=range(total), train_set=lambda k: tasks[k]),
        site=SimpleNamespace(
            site_id="site-a", state_dir=state, privacy=SimpleNamespace(research_seed=None)
        ),
        state_dir=run,
        task_index=task_index,
    )


def _class_il_tasks() -> list[TensorDataset]:
    gen = torch.Generator().manual_seed(5)
    return [
        TensorDataset(torch.randn(30, 3, generator=gen), torch.tensor([2 * t, 2 * t + 1] * 15))
        for t in range(4)
    ]


def test_a_site_that_missed_a_task_replays_it_like_one_that_did_not(tmp_path: Path) -> None:
    from fedcl.client.continual_site import replay_buffer

    tasks = _class_il_tasks()
    always, missed = tmp_path / "always", tmp_path / "missed"
    key = load_or_create_key(always)
    missed.mkdir()
    (missed / KEY_FILE).write_bytes(key)
    (missed / KEY_FILE).chmod(0o600)
    for t in (1, 2, 3):
        replay_buffer(_job(always, tasks, t))
    replay_buffer(_job(missed, tasks, 1))
    late = replay_buffer(_job(missed, tasks, 3))  # task 2 was never trained at this site
    assert late.tags == ["task-0", "task-1", "task-2"]
    assert sorted(late.class_counts()) == [0, 1, 2, 3, 4, 5]  # task 2's classes replayed
    on_time = ReplayBuffer.load(always / "runs" / "run-1" / "replay.safetensors", key=key)
    assert _contents(late) == _contents(on_time)
    assert load_or_create_key(missed) == key  # the key file was reused, not replaced
    again = replay_buffer(_job(missed, tasks, 3))  # a retried message: nothing added twice
    assert again.seen == 90 and _contents(again) == _contents(late)


def test_the_site_rebuilds_a_buffer_of_an_older_format_or_other_settings(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedcl.client.continual_site import replay_buffer

    tasks = _class_il_tasks()
    job = _job(tmp_path, tasks, 2)
    save_file({}, str(job.state_dir / "replay.safetensors"), metadata={"format": "fedcl-replay-v1"})
    rebuilt = replay_buffer(job)
    assert rebuilt.keyed and rebuilt.seen == 60 and len(rebuilt) == 12
    bigger = replay_buffer(_job(tmp_path, tasks, 2, replay_size=20, replay_policy="reservoir"))
    assert (bigger.capacity, bigger.policy, len(bigger)) == (20, "reservoir", 20)


def test_training_group_size_is_2_exactly_when_a_buffer_is_replayed(tmp_path: Path) -> None:
    from fedcl.client.continual_site import training_group_size, training_set

    tasks = _class_il_tasks()
    assert training_group_size(_job(tmp_path, tasks, 0)) == 1  # nothing to replay yet
    job = _job(tmp_path, tasks, 2)
    assert training_group_size(job) == 2
    assert len(training_set(job)) == 30 + 12
    assert training_group_size(_job(tmp_path, tasks, 2, method="naive")) == 1
    assert training_group_size(_job(tmp_path, tasks, 2, joint=True)) == 1
