"""Forgetting metrics over an accuracy matrix (Lopez-Paz & Ranzato, 2017; docs/DESIGN.md §7).

``R[i][j]`` is the accuracy on task ``j`` after training on task ``i``; ``baseline[j]`` is the
accuracy of the initial model on task ``j`` (needed for forward transfer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Matrix = Sequence[Sequence[float | None]]


def _array(matrix: Matrix) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)


def average_accuracy(matrix: Matrix) -> float | None:
    """Mean accuracy over all tasks after the last training task."""
    r = _array(matrix)
    if r.size == 0 or np.isnan(r[-1]).all():
        return None
    return float(np.nanmean(r[-1]))


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT: how much the final model lost (negative) or gained on earlier tasks."""
    r = _array(matrix)
    t = r.shape[0]
    if t < 2 or r.shape[1] < t:
        return None
    diffs = [r[-1, j] - r[j, j] for j in range(t - 1)]
    # None, not NaN, when no earlier task has both scores (e.g. a site that never scored them):
    # as FWT does; NaN would not survive into results.json.
    return None if np.isnan(diffs).all() else float(np.nanmean(diffs))


def forward_transfer(matrix: Matrix, baseline: Sequence[float | None]) -> float | None:
    """FWT: accuracy on a task *before* training on it, above the untrained model's."""
    r = _array(matrix)
    t = r.shape[0]
    if t < 2 or r.shape[1] < t or len(baseline) < t:
        return None
    b = np.array([np.nan if v is None else v for v in baseline], dtype=float)
    diffs = [r[j - 1, j] - b[j] for j in range(1, t)]
    return None if np.isnan(diffs).all() else float(np.nanmean(diffs))


def summarize(matrix: Matrix, baseline: Sequence[float | None] | None = None) -> dict:
    """ACC, BWT and FWT in one dict (``None`` where a metric is undefined)."""
    return {
        "avg_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, baseline) if baseline is not None else None,
    }
