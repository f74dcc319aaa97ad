"""The no-drift bootstrap: keyed subsamples of the reference, each set against the rest of it.

A window of ``n`` examples from the same distribution as a reference of ``N`` differs from it
only by sampling. The bootstrap reproduces exactly that at the site, without any data of
another site or of the future: ``B`` times, take a subsample ``S_b`` of ``n`` reference examples
and compute the statistic of (reference without ``S_b``, ``S_b``); the threshold is the
``quantile`` of those ``B`` values (the higher order statistic). Comparing with the *rest* of
the reference (``N − n`` examples) rather than all of it is slightly conservative: the spread
of a difference of means is ``1/n + 1/(N − n)``, not ``1/n + 1/N``.

**Keyed membership.** ``S_b`` is the bottom-``n`` of a keyed hash of each example (its bytes and
its occurrence number, under the site's key and ``b``), as for the replay buffer
(docs/DESIGN.md §7): whether an example is in ``S_b`` depends on that example and the key, not on
its position, so adding or removing one example changes each ``S_b`` by at most one slot. That
is what bounds the threshold's sensitivity (:func:`fedcl.continual.drift.monitor.sensitivity`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter

import numpy as np


def example_keys(rows: np.ndarray, key: bytes, label: bytes) -> list[bytes]:
    """A keyed 32-byte digest per row: its bytes, dtype, shape and occurrence number."""
    seen: Counter[bytes] = Counter()
    out = []
    arr = np.ascontiguousarray(rows)
    shape = repr((arr.dtype.str, arr.shape[1:])).encode()
    for row in arr:
        content = row.tobytes()
        j = seen[content]
        seen[content] += 1
        out.append(
            hmac.new(key, label + shape + content + j.to_bytes(8, "big"), hashlib.sha256).digest()
        )
    return out


def keyed_order(rows: np.ndarray, key: bytes, label: bytes) -> np.ndarray:
    """Indices of ``rows`` in keyed order (a keyed shuffle that ignores positions)."""
    digests = example_keys(rows, key, label)
    return np.array(sorted(range(len(digests)), key=digests.__getitem__), dtype=np.int64)


def subsample_masks(rows: np.ndarray, n: int, resamples: int, key: bytes) -> np.ndarray:
    """``(resamples, N)`` booleans: row ``b`` marks ``S_b``, the keyed bottom-``n`` of ``rows``."""
    total = len(rows)
    if not 0 < n < total:
        raise ValueError(f"a subsample of {n} needs a reference of more than {n}, got {total}")
    digests = example_keys(rows, key, b"drift-bootstrap")
    seeds = np.array([int.from_bytes(d[:8], "big") for d in digests], dtype=np.uint64)
    # Resample b's hash of example i: SplitMix64 of (its keyed seed, b), a function of that
    # example and the key alone.
    u = _splitmix64(seeds[:, None] + np.arange(resamples, dtype=np.uint64)[None, :] * _GOLDEN)
    chosen = np.argpartition(u, n - 1, axis=0)[:n]  # (n, resamples)
    masks = np.zeros((resamples, total), dtype=bool)
    masks[np.arange(resamples)[None, :].repeat(n, 0), chosen] = True
    return masks


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic), as floats in [0, 1)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def threshold(values: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the bootstrap statistics (the higher order statistic)."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), quantile, method="higher"))
