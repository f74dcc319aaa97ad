"""Site-local experience replay (docs/DESIGN.md §7): a bounded memory of earlier tasks' examples.

EWC alone does not solve class-incremental learning (Hsu et al., 2018; our Split-Digits
baseline: ~0.2 average accuracy, like fine-tuning), because nothing in a task's data asks the
head to keep scoring the old classes. Mixing a few stored old examples into every later task
does. The examples never leave the site: the buffer lives in the site state directory and only
enters training, so under DP it is protected exactly like the rest of the site's data.

Two selection policies, both deterministic from ``seed`` (the RNG state is saved with the
buffer, so a restarted site continues the same sequence):

* ``"reservoir"``: Vitter's algorithm R. After ``N`` examples have been offered, every one of
  them is in the buffer with probability ``capacity/N``: a uniform sample of the whole stream,
  so classes are kept in proportion to how often they were seen.
* ``"class-balanced"``: class-balanced reservoir sampling (CBRS, Chrysakis & Moens, 2020): an
  equal quota per class seen. When the buffer is full, an example of a class that is not among
  the largest evicts a random example of the largest class; an example of a largest ("full")
  class replaces a random example of its own class with probability ``m_c/n_c`` (stored over
  seen), i.e. reservoir sampling within the class. Minority classes thus keep all their
  examples until they reach their quota ``capacity / #classes``.

Privacy caveats for the ledger (tell the privacy owner): the buffer's examples are trained on
again in later tasks, so a site's DP accounting must compose every round of every task over the
site's whole dataset (no per-task budgets as if the tasks were disjoint). And the buffer's
*content* depends on the data (algorithm R's random stream shifts when one example is removed;
class quotas depend on the label counts), so a neighbouring dataset can change more than one
buffer slot; DP-SGD's add/remove-one guarantee for the later tasks then holds only for the
realised buffer. A selection that is stable under removing one example (for example keyed
bottom-k sampling, which changes at most one slot) would make it exact.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from fedcl.config import ConfigError, FedclError

POLICIES = ("reservoir", "class-balanced")
FORMAT = "fedcl-replay-v1"


def _check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise ConfigError(
            f"field 'continual.replay_size': {capacity!r} is not valid; use a whole number of "
            "examples >= 1 (typically a few per class, at most the site's training examples)"
        )
    return capacity


def check_replay_size(capacity: int, n_site_examples: int, site_id: str) -> None:
    """A buffer must be positive and no larger than the site's training data.

    A buffer that can hold all of a site's data is joint training in disguise (and allocates
    memory for nothing): the site administrator should see that before the run starts.
    """
    _check_capacity(capacity)
    if capacity > n_site_examples:
        raise ConfigError(
            f"site {site_id}: field 'continual.replay_size' = {capacity} exceeds the site's "
            f"{n_site_examples} training examples; use continual.replay_size <= "
            f"{n_site_examples} (a buffer that holds everything is joint training)"
        )


def check_replay_policy(policy: str) -> str:
    """Validate ``continual.replay_policy``."""
    if policy not in POLICIES:
        raise ConfigError(f"field 'continual.replay_policy': {policy!r} is not one of {POLICIES}")
    return policy


class ReplayBuffer:
    """A bounded, seeded sample of ``(x, y)`` examples seen so far at one site.

    ``y`` are the model's training targets (after the stream's label mapping), so the buffer
    mixes into a task dataset as is.
    """

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0) -> None:
        self.capacity = _check_capacity(capacity)
        self.policy = check_replay_policy(policy)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._x: list[torch.Tensor] = []
        self._y: list[int] = []
        self.seen = 0  # examples offered so far
        self._seen_per_class: dict[int, int] = {}
        self._slots: dict[int, list[int]] = {}  # class -> sorted buffer slots holding it
        self._full: set[int] = set()  # CBRS: classes that are or have been the largest
        self.tags: list[str] = []  # datasets already offered (idempotency)

    def __len__(self) -> int:
        return len(self._y)

    def class_counts(self) -> dict[int, int]:
        """Stored examples per class."""
        return {c: len(s) for c, s in sorted(self._slots.items()) if s}

    def seen_per_class(self) -> dict[int, int]:
        """Examples offered per class (the ``n_c`` of class-balanced sampling)."""
        return dict(sorted(self._seen_per_class.items()))

    # -- adding -------------------------------------------------------------------------------

    def add(self, x: torch.Tensor, y: torch.Tensor | Sequence[int] | int) -> None:
        """Offer a batch ``x [B, ...]`` with targets ``y [B]`` (or one example, ``y`` scalar).

        Examples are offered in order; the outcome depends only on the seed and the order.
        """
        y_t = torch.as_tensor(y)
        if y_t.dim() == 0:
            x, y_t = x.unsqueeze(0), y_t.unsqueeze(0)
        if len(x) != len(y_t):
            raise FedclError(f"replay add: {len(x)} inputs but {len(y_t)} targets")
        for xi, yi in zip(x, y_t.tolist(), strict=True):
            self._offer(xi, int(yi))

    def add_dataset(
        self, dataset: Dataset, batch_size: int = 256, *, tag: str | None = None
    ) -> bool:
        """Offer every example of ``dataset`` in index order (call at the end of each task).

        Offer the task's own examples, not the mixed dataset: re-offering the buffer's examples
        would count them twice. ``tag`` (e.g. ``"<run>/task-3"``) makes the call idempotent for
        retried messages and restarted sites; returns False when the tag was already added.
        """
        if tag is not None and tag in self.tags:
            return False
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            self.add(x, y)
        if tag is not None:
            self.tags.append(tag)
        return True

    def _check_example(self, x: torch.Tensor) -> None:
        if self._x and (x.shape != self._x[0].shape or x.dtype != self._x[0].dtype):
            raise FedclError(
                f"replay buffer holds inputs of shape {tuple(self._x[0].shape)} "
                f"({self._x[0].dtype}); got {tuple(x.shape)} ({x.dtype}): the dataset changed"
            )

    def _offer(self, x: torch.Tensor, y: int) -> None:
        self._check_example(x)
        self.seen += 1
        self._seen_per_class[y] = self._seen_per_class.get(y, 0) + 1
        if len(self._y) < self.capacity:
            self._put(len(self._y), x, y)
            if self.policy == "class-balanced":
                self._update_full()
            return
        if self.policy == "reservoir":
            j = int(self._rng.integers(0, self.seen))  # uniform over the seen so far
            if j < self.capacity:
                self._put(j, x, y)
            return
        self._offer_balanced(x, y)

    def _offer_balanced(self, x: torch.Tensor, y: int) -> None:
        if y not in self._full:
            counts = self.class_counts()
            largest = max(counts.values())
            candidates = sorted(c for c, m in counts.items() if m == largest)
            victim = candidates[int(self._rng.integers(0, len(candidates)))]
            slots = self._slots[victim]
            self._put(slots[int(self._rng.integers(0, len(slots)))], x, y)
            self._update_full()
            return
        stored = len(self._slots.get(y, ()))
        if self._rng.random() * self._seen_per_class[y] < stored:  # probability m_c / n_c
            slots = self._slots[y]
            self._put(slots[int(self._rng.integers(0, len(slots)))], x, y)

    def _update_full(self) -> None:
        counts = self.class_counts()
        if counts:
            largest = max(counts.values())
            self._full.update(c for c, m in counts.items() if m == largest)

    def _put(self, slot: int, x: torch.Tensor, y: int) -> None:
        x = x.detach().to("cpu").clone()  # a copy, not a view pinning the whole dataset
        if slot == len(self._y):
            self._x.append(x)
            self._y.append(y)
        else:
            old = self._y[slot]
            self._slots[old].pop(bisect.bisect_left(self._slots[old], slot))
            self._x[slot], self._y[slot] = x, y
        bisect.insort(self._slots.setdefault(y, []), slot)

    # -- reading ------------------------------------------------------------------------------

    def sample_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored examples as ``(x [M, ...], y [M])`` in slot order."""
        if not self._y:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.stack(self._x), torch.tensor(self._y, dtype=torch.long)

    def as_dataset(self) -> TensorDataset:
        """The stored examples as a ``TensorDataset`` (what :func:`mixed_dataset` appends)."""
        return TensorDataset(*self.sample_all())

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the buffer and its sampling state to ``path`` (safetensors; atomic rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        if self._y:
            x, y = self.sample_all()
            tensors = {"x": x.contiguous(), "y": y}
        metadata = {
            "format": FORMAT,
            "capacity": str(self.capacity),
            "policy": self.policy,
            "seed": str(self.seed),
            "seen": str(self.seen),
            "seen_per_class": json.dumps({str(k): v for k, v in self._seen_per_class.items()}),
            "full": json.dumps(sorted(self._full)),
            "rng": json.dumps(self._rng.bit_generator.state),
            "tags": json.dumps(self.tags),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`; adding continues the same random sequence."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FedclError(f"replay buffer {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if meta.get("format") != FORMAT:
                raise FedclError(
                    f"replay buffer {path} has format {meta.get('format')!r}, expected {FORMAT!r}"
                )
            buf = cls(int(meta["capacity"]), meta["policy"], int(meta["seed"]))
            buf.seen = int(meta["seen"])
            buf._seen_per_class = {int(k): v for k, v in json.loads(meta["seen_per_class"]).items()}
            buf._full = {int(c) for c in json.loads(meta["full"])}
            buf._rng.bit_generator.state = json.loads(meta["rng"])
            buf.tags = [str(t) for t in json.loads(meta.get("tags", "[]"))]
        except FedclError:
            raise
        except Exception as exc:  # safetensors/json/key errors: a damaged file
            raise FedclError(f"replay buffer {path} cannot be read: {exc}") from exc
        if tensors:
            x, y = tensors["x"], tensors["y"].tolist()
            if len(y) > buf.capacity:
                raise FedclError(f"replay buffer {path} holds more examples than its capacity")
            for slot, (xi, yi) in enumerate(zip(x, y, strict=True)):
                buf._put(slot, xi, int(yi))
        return buf

    def __repr__(self) -> str:
        return (
            f"ReplayBuffer(capacity={self.capacity}, policy={self.policy!r}, "
            f"stored={len(self)}, seen={self.seen}, classes={self.class_counts()})"
        )


def mixed_dataset(task_dataset: Dataset, buffer: ReplayBuffer) -> Dataset:
    """The task's examples followed by the buffer's: what the site trains on for this task.

    Under DP the buffer's examples are part of the site's dataset for this task: Opacus'
    Poisson sampling draws each of the ``N = len(task_dataset) + len(buffer)`` examples
    independently with the sample rate ``q = 1/⌈N/B⌉ ≈ B/N`` (batch size ``B``), and the ledger
    must record exactly that ``q``: the DP hook derives it from the loader over this dataset,
    so it does, as long as nothing recomputes it from the task's examples alone. The example
    count reported for the weighted FedAvg is also ``N``. An empty buffer returns
    ``task_dataset`` unchanged.
    """
    if len(buffer) == 0:
        return task_dataset
    replay = buffer.as_dataset()
    if len(task_dataset) > 0:  # type: ignore[arg-type]
        x0, _ = task_dataset[0]
        xb = replay.tensors[0]
        if tuple(torch.as_tensor(x0).shape) != tuple(xb.shape[1:]) or (
            torch.as_tensor(x0).dtype != xb.dtype
        ):
            raise FedclError(
                f"replay buffer inputs {tuple(xb.shape[1:])} ({xb.dtype}) do not match the "
                f"task's {tuple(torch.as_tensor(x0).shape)} ({torch.as_tensor(x0).dtype}): "
                "the buffer in the site state directory belongs to another dataset"
            )
    return ConcatDataset([task_dataset, replay])
