"""Drift statistics of a reference sample and a window, and the projection they work on.

Every detector is a statistic ``d(reference, window) >= 0`` that grows as the two samples move
apart, with a vectorised form over many subsample pairs for the calibration bootstrap
(:mod:`.calibration`). Those that can run under DP state ``unit``: the most one example's
substitution can move the statistic, times the sample size (``unit / n``); see
:func:`fedcl.continual.drift.monitor.sensitivity`.

* ``mmd``: ``‖mean(window) − mean(reference)‖₂``, the maximum mean discrepancy with a linear
  kernel (the mean-embedding distance). Its own test is a permutation test (alibi-detect's
  ``MMDDrift`` with a linear kernel). Under DP the features are clipped to L2 norm ``C``, so a
  substitution moves a mean by at most ``2C / n``: ``unit = 2C``.
* ``ks``: the largest per-dimension two-sample Kolmogorov–Smirnov distance; its own test is
  the asymptotic KS p-value with a Bonferroni correction over the dimensions (alibi-detect's
  ``KSDrift``). A substitution moves an empirical CDF by at most ``1 / n``: ``unit = 1``.
* ``kl`` / ``psi``: histograms of each dimension on the reference's quantile bins (Jeffreys
  pseudo-count 0.5), ``KL(window ‖ reference)`` or the population stability index, largest over
  the dimensions. The seeds' ``KL > 0.15`` rule is ``detector = "kl"``, ``calibration =
  "fixed"``, ``threshold = 0.15``. Not under DP (a log of a small bin count has no useful bound).

On the predicted classes: :func:`total_variation` of the class frequencies (``unit = 1``) and
:func:`rate_shift`, the largest move of one class's predicted rate (``unit = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcl.config import ConfigError

Array = np.ndarray


def project(embeddings: Array, dim: int, *, seed: int, reference: Array | None = None) -> Array:
    """``embeddings`` ``(n, D)`` projected to ``dim`` dimensions.

    ``reference=None``: a fixed random projection with orthonormal rows, drawn from ``seed``
    alone (the same at every site and every round, and independent of any data, so it costs no
    privacy; ``‖Rz‖ ≤ ‖z‖``). With ``reference`` (no DP only): the top ``dim`` principal axes of
    the reference window. ``D <= dim`` leaves the embeddings as they are.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (n, D), got shape {x.shape}")
    width = x.shape[1]
    if width <= dim:
        return x
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64)
        _, _, vt = np.linalg.svd(ref - ref.mean(0), full_matrices=False)
        return x @ vt[:dim].T
    g = np.random.default_rng([int(seed), width, dim]).standard_normal((width, dim))
    q, _ = np.linalg.qr(g)  # (D, dim), orthonormal columns
    return x @ q


def clip_rows(x: Array, norm: float) -> Array:
    """Each row scaled to L2 norm at most ``norm`` (DP-SGD's per-sample clipping)."""
    lengths = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, norm / np.maximum(lengths, 1e-12))


@dataclass(frozen=True)
class Detector:
    """A drift statistic; ``dp`` says whether it has a per-example bound (``unit``)."""

    name: str
    dp: bool

    def statistic(self, reference: Array, window: Array, *, bins: int = 10) -> float:
        return float(self.pairs(reference, [(np.arange(len(reference)), window)], bins=bins)[0])

    def pairs(self, reference: Array, pairs, *, bins: int = 10) -> Array:  # pragma: no cover
        raise NotImplementedError

    def subsample_statistics(self, reference: Array, masks: Array, *, bins: int = 10) -> Array:
        """The statistic of (reference without S_b, S_b) for each row ``b`` of ``masks``."""
        return self.pairs(reference, [(np.flatnonzero(~m), reference[m]) for m in masks], bins=bins)

    def unit(self, clip_norm: float) -> float:
        """One substitution moves the statistic by at most ``unit / n`` (n: a sample's size)."""
        if not self.dp:
            raise ConfigError(f"drift detector {self.name!r} has no sensitivity bound for DP")
        return 2.0 * clip_norm if self.name == "mmd" else 1.0

    def p_value(self, reference: Array, window: Array, *, seed: int = 0) -> float:
        """The detector's own test of "same distribution" (``calibration = "test"``)."""
        raise ConfigError(f"drift detector {self.name!r} has no test of its own; use bootstrap")


class _MMD(Detector):
    def pairs(self, reference, pairs, *, bins=10):
        return np.array([np.linalg.norm(w.mean(0) - reference[idx].mean(0)) for idx, w in pairs])

    def subsample_statistics(self, reference, masks, *, bins=10):
        m = masks.astype(np.float64)
        sizes = m.sum(1, keepdims=True)
        inside = m @ reference
        outside = reference.sum(0)[None, :] - inside
        rest = len(reference) - sizes
        return np.linalg.norm(inside / sizes - outside / rest, axis=1)

    def p_value(self, reference, window, *, seed=0, permutations=500):
        rng = np.random.default_rng(seed)
        pooled = np.concatenate([reference, window])
        n = len(window)
        observed = self.statistic(reference, window)
        hits = 0
        for _ in range(permutations):
            perm = rng.permutation(len(pooled))
            w, r = pooled[perm[:n]], pooled[perm[n:]]
            hits += np.linalg.norm(w.mean(0) - r.mean(0)) >= observed
        return (hits + 1) / (permutations + 1)


def _ks_rows(a: Array, b: Array) -> Array:
    """Two-sample KS distance of every column of ``a`` against the same column of ``b``."""
    out = np.empty(a.shape[1])
    for d in range(a.shape[1]):
        x, y = np.sort(a[:, d]), np.sort(b[:, d])
        grid = np.concatenate([x, y])
        fx = np.searchsorted(x, grid, side="right") / len(x)
        fy = np.searchsorted(y, grid, side="right") / len(y)
        out[d] = np.abs(fx - fy).max()
    return out


def kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution (the KS statistic's asymptotic law)."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the series converges slowly here; the probability is 1 to double precision
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * x * x) for j in range(1, 101))
    return float(min(1.0, max(0.0, 2.0 * total)))


class _KS(Detector):
    def pairs(self, reference, pairs, *, bins=10):
        return np.array([_ks_rows(w, reference[idx]).max() for idx, w in pairs])

    def subsample_statistics(self, reference, masks, *, bins=10):
        # S_b and its rest partition the reference: both ECDFs step only at reference points,
        # so the sup is over the reference sorted once per dimension (cumulative counts).
        m = masks.astype(np.float64)
        sizes = m.sum(1, keepdims=True)
        rest = len(reference) - sizes
        out = np.zeros(len(masks))
        for d in range(reference.shape[1]):
            ordered = m[:, np.argsort(reference[:, d], kind="stable")]
            inside = np.cumsum(ordered, axis=1)
            outside = np.arange(1, len(reference) + 1)[None, :] - inside
            out = np.maximum(out, np.abs(inside / sizes - outside / rest).max(1))
        return out

    def p_value(self, reference, window, *, seed=0):
        n, m = len(window), len(reference)
        scale = math.sqrt(n * m / (n + m))
        dists = _ks_rows(window, reference)
        p = min(kolmogorov_sf(scale * d) for d in dists)
        return min(1.0, p * len(dists))  # Bonferroni over the dimensions


def _histograms(reference: Array, samples: list[Array], bins: int) -> tuple[Array, list[Array]]:
    """Per-dimension bin frequencies (pseudo-count 0.5) on the reference's quantile bins."""
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    edges = [np.unique(np.quantile(reference[:, d], qs)) for d in range(reference.shape[1])]

    def freq(x: Array) -> Array:
        rows = []
        for d, e in enumerate(edges):
            counts = np.bincount(np.searchsorted(e, x[:, d], side="right"), minlength=bins)
            counts = counts[:bins] + 0.5
            rows.append(counts / counts.sum())
        return np.array(rows)

    return freq(reference), [freq(s) for s in samples]


class _Histogram(Detector):
    def pairs(self, reference, pairs, *, bins=10):
        out = []
        for idx, w in pairs:
            ref = reference[idx]
            p, (q,) = _histograms(ref, [w], bins)
            if self.name == "kl":
                value = (q * np.log(q / p)).sum(1)
            else:
                value = ((q - p) * np.log(q / p)).sum(1)
            out.append(value.max())
        return np.array(out)


DETECTORS: dict[str, Detector] = {
    "mmd": _MMD("mmd", dp=True),
    "ks": _KS("ks", dp=True),
    "kl": _Histogram("kl", dp=False),
    "psi": _Histogram("psi", dp=False),
}


def get_detector(name: str) -> Detector:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ConfigError(
            f"field 'drift.detector': {name!r} is not one of {', '.join(DETECTORS)}"
        ) from None


def class_frequencies(predictions: Array, num_classes: int) -> Array:
    """Frequency of each predicted class (rows: one per sample in ``predictions``)."""
    counts = np.bincount(np.asarray(predictions, dtype=np.int64), minlength=num_classes)
    return counts[:num_classes] / max(1, len(predictions))


def total_variation(p: Array, q: Array) -> float:
    """½‖p − q‖₁ of two frequency vectors: a substitution moves one by at most 1/n."""
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def rate_shift(p: Array, q: Array) -> float:
    """The largest move of one class's rate, ``max_c |p_c − q_c|`` (the seeds' 5 % rule)."""
    return float(np.abs(np.asarray(p) - np.asarray(q)).max())


def subsample_total_variation(onehot: Array, masks: Array) -> Array:
    """TV of (rest, S_b) predicted-class frequencies for every subsample mask row."""
    m = masks.astype(np.float64)
    sizes = m.sum(1, keepdims=True)
    inside = m @ onehot
    outside = onehot.sum(0)[None, :] - inside
    return 0.5 * np.abs(inside / sizes - outside / (len(onehot) - sizes)).sum(1)
