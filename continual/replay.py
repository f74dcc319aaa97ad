"""Site-local experience replay (docs/DESIGN.md §7): a bounded memory of earlier tasks' examples.

EWC alone does not solve class-incremental learning (Hsu et al., 2018; our Split-Digits
baseline: ~0.2 average accuracy, like fine-tuning), because nothing in a task's data asks the
head to keep scoring the old classes. Mixing a few stored old examples into every later task
does. The examples never leave the site: the buffer lives in the site state directory and only
enters training, so under DP it is protected like the rest of the site's data.

**Membership is keyed bottom-k**: every example gets a score ``HMAC-SHA256(key, content)`` (its
bytes, target and occurrence number) and the buffer keeps the smallest — overall
(``"reservoir"``: a uniform sample without replacement) or per class with equal quotas, minority
classes whole (``"class-balanced"``, round-robin over keyed class priorities). The buffer is a
deterministic function of the set of examples offered, the key, the capacity and the policy, so
a site that missed a task rebuilds exactly the same buffer, and **adding or removing one
example changes at most one slot** whatever the data and the key. The proof, the key
(:mod:`.replay_keys`) and what it means for DP (group size 2 under add/remove adjacency) are in
docs/DESIGN.md §7, "Replay membership".
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from fedcl.config import ConfigError, FedclError

from .replay_keys import key_id, seed_key

POLICIES = ("reservoir", "class-balanced")
FORMAT = "fedcl-replay-v2"
OLD_FORMATS = ("fedcl-replay-v1",)  # draw-dependent sampling: rebuilt, never continued
_DIGEST_BYTES = 16  # content ids of seen examples (128 bits: collisions are out of reach)


class ReplayBufferMismatch(FedclError):
    """A readable buffer file built for other settings (older format, another key).

    The buffer is a function of the site's data, so the caller can rebuild it.
    """


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


# -- the buffer -----------------------------------------------------------------------------------


@dataclass
class _Entry:
    score: bytes
    y: int
    occurrence: int
    x: torch.Tensor


class ReplayBuffer:
    """A bounded keyed bottom-k sample of the ``(x, y)`` examples seen so far at one site.

    ``y`` are the model's training targets (after the stream's label mapping), so the buffer
    mixes into a task dataset as is. ``key`` is the site's secret (:func:`load_or_create_key`);
    without one the key is derived from ``seed``.
    """

    def __init__(
        self,
        capacity: int,
        policy: str = "reservoir",
        seed: int | None = 0,
        *,
        key: bytes | None = None,
    ) -> None:
        self.capacity = _check_capacity(capacity)
        self.policy = check_replay_policy(policy)
        if key is None:
            if seed is None:
                raise FedclError("a replay buffer needs a key or a seed")
            self.seed: int | None = int(seed)
            self._key = seed_key(self.seed)
        else:
            if not isinstance(key, bytes) or len(key) < 16:
                raise FedclError("a replay key must be at least 16 bytes")
            self.seed = None
            self._key = key
        self.key_id = key_id(self._key)
        self.seen = 0  # examples offered so far
        self._seen_per_class: dict[int, int] = {}
        self._occurrences: dict[bytes, int] = {}  # content id -> copies seen
        self._kept: dict[int, list[_Entry]] = {}  # class -> kept entries, ascending score
        self._priority: dict[int, bytes] = {}
        self._example: tuple[tuple[int, ...], torch.dtype] | None = None
        self.tags: list[str] = []  # datasets already offered (idempotency)

    @property
    def keyed(self) -> bool:
        """Whether the buffer uses a site's secret key (not one derived from a seed)."""
        return self.seed is None

    def __len__(self) -> int:
        return sum(len(v) for v in self._kept.values())

    def class_counts(self) -> dict[int, int]:
        """Stored examples per class."""
        return {c: len(v) for c, v in sorted(self._kept.items()) if v}

    def seen_per_class(self) -> dict[int, int]:
        """Examples offered per class (the ``n_c`` of the class quotas)."""
        return dict(sorted(self._seen_per_class.items()))

    def quotas(self) -> dict[int, int]:
        """How many examples of each class the buffer holds given the counts seen.

        Reservoir: whatever the bottom-k holds. Class-balanced: the bottom-``capacity`` of the
        virtual keys ``(r, π(c)), r < n_c`` (round-robin over the classes in ``π`` order).
        """
        if self.policy == "reservoir":
            return self.class_counts()
        return self._allocation()

    # -- scores -------------------------------------------------------------------------------

    def _content_id(self, header: bytes, row: bytes, y: int) -> bytes:
        msg = b"fedcl-replay/example\0" + header + y.to_bytes(8, "little", signed=True) + row
        return hmac.digest(self._key, msg, "sha256")[:_DIGEST_BYTES]

    def _score(self, content_id: bytes, occurrence: int) -> bytes:
        msg = b"fedcl-replay/score\0" + content_id + occurrence.to_bytes(8, "little")
        return hmac.digest(self._key, msg, "sha256")

    def _class_priority(self, c: int) -> bytes:
        if c not in self._priority:
            msg = b"fedcl-replay/class\0" + c.to_bytes(8, "little", signed=True)
            self._priority[c] = hmac.digest(self._key, msg, "sha256")
        return self._priority[c]

    @staticmethod
    def _rows(x: torch.Tensor) -> tuple[bytes, np.ndarray]:
        """The batch's header (dtype, shape of one example) and each example's raw bytes."""
        x = x.detach().to("cpu").contiguous()
        header = f"{x.dtype}|{tuple(x.shape[1:])}|".encode()
        flat = x.reshape(len(x), -1)
        if flat.shape[1] == 0:
            return header, np.zeros((len(x), 0), dtype=np.uint8)
        return header, flat.view(torch.uint8).numpy()

    # -- adding -------------------------------------------------------------------------------

    def add(self, x: torch.Tensor, y: torch.Tensor | Sequence[int] | int) -> None:
        """Offer a batch ``x [B, ...]`` with targets ``y [B]`` (or one example, ``y`` scalar).

        The outcome depends only on the key and the multiset of examples offered (not on their
        order or batching).
        """
        y_t = torch.as_tensor(y)
        if y_t.dim() == 0:
            x, y_t = x.unsqueeze(0), y_t.unsqueeze(0)
        if len(x) != len(y_t):
            raise FedclError(f"replay add: {len(x)} inputs but {len(y_t)} targets")
        if len(x) == 0:
            return
        self._check_example(x[0])
        header, rows = self._rows(x)
        for i, yi in enumerate(y_t.tolist()):
            self._offer(x, i, header, rows[i].tobytes(), int(yi))

    def add_dataset(
        self, dataset: Dataset, batch_size: int = 256, *, tag: str | None = None
    ) -> bool:
        """Offer every example of ``dataset`` (call at the end of each task).

        Offer the task's own examples, not the mixed dataset: re-offering the buffer's examples
        would count them twice. ``tag`` (e.g. ``"task-3"``) makes the call idempotent for
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
        spec = (tuple(x.shape), x.dtype)
        if self._example is None:
            self._example = spec
        elif spec != self._example:
            raise FedclError(
                f"replay buffer holds inputs of shape {self._example[0]} ({self._example[1]}); "
                f"got {spec[0]} ({spec[1]}): the dataset changed"
            )

    def _offer(self, x: torch.Tensor, i: int, header: bytes, row: bytes, y: int) -> None:
        content = self._content_id(header, row, y)
        occurrence = self._occurrences.get(content, 0)
        self._occurrences[content] = occurrence + 1
        self.seen += 1
        self._seen_per_class[y] = self._seen_per_class.get(y, 0) + 1
        score = self._score(content, occurrence)
        kept = self._kept.setdefault(y, [])
        if self.policy == "reservoir":
            if len(self) < self.capacity:
                self._insert(kept, score, y, occurrence, x[i])
                return
            worst_class, worst = max(
                ((c, v[-1]) for c, v in self._kept.items() if v), key=lambda cv: cv[1].score
            )
            if score < worst.score:
                self._kept[worst_class].pop()
                self._insert(kept, score, y, occurrence, x[i])
            return
        quotas = self._allocation()
        if len(kept) < quotas.get(y, 0) or (kept and score < kept[-1].score):
            self._insert(kept, score, y, occurrence, x[i])
        for c, entries in self._kept.items():
            del entries[quotas.get(c, 0) :]

    @staticmethod
    def _insert(kept: list[_Entry], score: bytes, y: int, occurrence: int, x: torch.Tensor) -> None:
        lo, hi = 0, len(kept)
        while lo < hi:  # first entry with a larger score (scores are distinct)
            mid = (lo + hi) // 2
            if kept[mid].score < score:
                lo = mid + 1
            else:
                hi = mid
        # a copy, not a view pinning the whole batch
        kept.insert(lo, _Entry(score, y, occurrence, x.detach().to("cpu").clone()))

    def _allocation(self) -> dict[int, int]:
        """Class quotas: the bottom-``capacity`` of the virtual keys ``(r, π(c))``, ``r < n_c``."""
        n = self._seen_per_class
        k = self.capacity
        if sum(n.values()) <= k:
            return dict(n)

        def filled(level: int) -> int:
            return sum(min(v, level) for v in n.values())

        lo, hi = 0, k  # the largest level L with filled(L) <= k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if filled(mid) <= k:
                lo = mid
            else:
                hi = mid - 1
        quotas = {c: min(v, lo) for c, v in n.items()}
        rest = k - sum(quotas.values())
        for c in sorted((c for c, v in n.items() if v > lo), key=self._class_priority)[:rest]:
            quotas[c] += 1
        return quotas

    # -- reading ------------------------------------------------------------------------------

    def _entries(self) -> list[_Entry]:
        return sorted((e for v in self._kept.values() for e in v), key=lambda e: e.score)

    def sample_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored examples as ``(x [M, ...], y [M])``, in ascending score."""
        entries = self._entries()
        if not entries:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.stack([e.x for e in entries]), torch.tensor(
            [e.y for e in entries], dtype=torch.long
        )

    def as_dataset(self) -> TensorDataset:
        """The stored examples as a ``TensorDataset`` (what :func:`mixed_dataset` appends)."""
        return TensorDataset(*self.sample_all())

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the buffer and what adding needs to ``path`` (safetensors, mode 0600, atomic).

        The file holds the kept examples, their occurrence numbers and the content ids (keyed,
        16 bytes) and copy counts of every example seen; never the key.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        entries = self._entries()
        if entries:
            x, y = self.sample_all()
            tensors = {
                "x": x.contiguous(),
                "y": y,
                "occurrence": torch.tensor([e.occurrence for e in entries], dtype=torch.long),
            }
        if self._occurrences:
            ids = b"".join(self._occurrences)
            tensors["seen_id"] = torch.frombuffer(bytearray(ids), dtype=torch.uint8).reshape(
                -1, _DIGEST_BYTES
            )
            tensors["seen_count"] = torch.tensor(list(self._occurrences.values()))
        example = None
        if self._example is not None:
            example = {"shape": list(self._example[0]), "dtype": str(self._example[1])}
        metadata = {
            "format": FORMAT,
            "capacity": str(self.capacity),
            "policy": self.policy,
            "seed": "" if self.seed is None else str(self.seed),
            "key_id": self.key_id,
            "seen": str(self.seen),
            "seen_per_class": json.dumps({str(k): v for k, v in self._seen_per_class.items()}),
            "example": json.dumps(example),
            "tags": json.dumps(self.tags),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o600)  # raw examples of the site
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, key: bytes | None = None) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`; adding to it continues as if never saved.

        A buffer built with a site key needs that ``key``; :class:`ReplayBufferMismatch` when
        the file is of an older format or was built with another key (rebuild it).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FedclError(f"replay buffer {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors errors: a damaged file
            raise FedclError(f"replay buffer {path} cannot be read: {exc}") from exc
        if meta.get("format") in OLD_FORMATS:
            raise ReplayBufferMismatch(
                f"replay buffer {path} has the older format {meta.get('format')!r} (membership "
                "drawn at random, not keyed bottom-k); rebuild it from the site's data"
            )
        if meta.get("format") != FORMAT:
            raise FedclError(
                f"replay buffer {path} has format {meta.get('format')!r}, expected {FORMAT!r}"
            )
        try:
            seed = int(meta["seed"]) if meta["seed"] else None
            if seed is None and key is None:
                raise FedclError(
                    f"replay buffer {path} was built with the site's replay key; pass key="
                )
            buf = cls(int(meta["capacity"]), meta["policy"], seed, key=key)
            if buf.key_id != meta["key_id"]:
                raise ReplayBufferMismatch(
                    f"replay buffer {path} was built with another key (id {meta['key_id']}, "
                    f"not {buf.key_id}); rebuild it from the site's data"
                )
            buf._restore(meta, tensors)
        except FedclError:
            raise
        except Exception as exc:  # json/key/shape errors: a damaged file
            raise FedclError(f"replay buffer {path} cannot be read: {exc}") from exc
        return buf

    def _restore(self, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        self.seen = int(meta["seen"])
        per_class = json.loads(meta["seen_per_class"]).items()
        self._seen_per_class = {int(k): int(v) for k, v in per_class}
        self.tags = [str(t) for t in json.loads(meta.get("tags", "[]"))]
        example = json.loads(meta["example"])
        if example is not None:
            dtype = getattr(torch, example["dtype"].removeprefix("torch."))
            self._example = (tuple(int(s) for s in example["shape"]), dtype)
        if "seen_id" in tensors:
            ids = tensors["seen_id"].numpy().tobytes()
            counts = tensors["seen_count"].tolist()
            self._occurrences = {
                ids[i * _DIGEST_BYTES : (i + 1) * _DIGEST_BYTES]: int(c)
                for i, c in enumerate(counts)
            }
        if (
            sum(self._occurrences.values()) != self.seen
            or sum(self._seen_per_class.values()) != self.seen
        ):
            raise ValueError("the counts of examples seen do not add up")
        if "x" in tensors:
            x, y, occ = tensors["x"], tensors["y"].tolist(), tensors["occurrence"].tolist()
            if not len(x) == len(y) == len(occ) <= self.capacity:
                raise ValueError("more examples than the capacity, or ragged tensors")
            header, rows = self._rows(x)
            for i, (yi, oi) in enumerate(zip(y, occ, strict=True)):
                content = self._content_id(header, rows[i].tobytes(), int(yi))
                if not 0 <= oi < self._occurrences.get(content, 0):
                    raise ValueError(f"stored example {i} was never seen")
                kept = self._kept.setdefault(int(yi), [])
                self._insert(kept, self._score(content, int(oi)), int(yi), int(oi), x[i])
        if len(self) != min(self.capacity, self.seen) or self.class_counts() != {
            c: m for c, m in sorted(self.quotas().items()) if m
        }:
            raise ValueError("the stored examples per class do not match the quotas")

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
