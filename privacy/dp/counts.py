"""Private evaluation: a site's per-task (correct, count) released with Gaussian noise.

The mechanism, stated before it runs (docs/DESIGN.md §15, "a privacy mechanism"): the vector of
every evaluation task's ``(correct_j, count_j)`` over the site's test examples, plus
``N(0, (σ·√2)²)`` on each coordinate. One test example more or less changes ``count_j`` by 1 and
``correct_j`` by at most 1 for the one task it belongs to (the evaluation tasks' test sets are
disjoint), so the L2 sensitivity is √2 and this is one Gaussian mechanism of noise multiplier σ:
a full-data release (``sample_rate = 1``, ``steps = 1``) the site's ledger composes with its
DP-SGD and Fisher releases. The losses are not released (their sensitivity is unbounded unless
clipped, and the accuracy matrix does not need them).

:func:`evaluation_release` is what the site charges *before* it evaluates; :func:`noised_counts`
runs the mechanism with exactly that σ and returns it with the noise. The noise comes from a
generator seeded from the OS (:mod:`secrets`): an experiment seed is public.

Loads no torch at import (the coordinator reads :data:`COUNT_SENSITIVITY` to state the noise).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

from ..ledger import DPRelease
from .planning import DPConfigError, _check_noise

MECHANISM_EVALUATION = "dp-evaluation"
#: L2 sensitivity of the per-task (correct, count) vector to one test example.
COUNT_SENSITIVITY = math.sqrt(2.0)


#: Share of ``dp.epsilon`` the noised evaluations may spend when the test data is its own cell.
#: Not all of it: σ is rounded up to 0.01 and the ledger composes in floats, so the releases
#: land just below the share, never above ε.
TEST_CELL_SHARE = 0.9


def sequential_evaluation_noise(epsilon: float | None) -> float:
    """σ of a noised evaluation when it composes with the site's training (one run, one ε).

    24/ε within [3, 20] (3 at ε = 8; 20 without a target ε): the 1 + tasks evaluations then
    raise DP-SGD's planned σ by ~16% on digits (docs/DESIGN.md §9), while a σ of 20 swamped the
    accuracy matrix on a few dozen test examples per site and task.
    """
    return 20.0 if epsilon is None else min(20.0, max(3.0, 24.0 / float(epsilon)))


def evaluation_noise_for_budget(epsilon: float, delta: float, releases: int) -> float:
    """The least σ (rounded up to 0.01) at which ``releases`` noised evaluations compose to at
    most ``epsilon`` by the ledger's own accountant: what the test data's cell can afford when
    no other release reads it (parallel composition)."""
    from ..ledger import compose_epsilon

    if releases < 1:
        return sequential_evaluation_noise(epsilon)

    def spent(sigma: float) -> float:
        return compose_epsilon([(sigma, 1.0, releases)], delta, "rdp")

    lo, hi = 0.05, 64.0
    if spent(hi) > epsilon:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return math.ceil(hi * 100) / 100


def evaluation_release(noise_multiplier: float, delta: float) -> DPRelease:
    """What one noised evaluation spends: one Gaussian release at σ over the whole test set."""
    _check_noise(noise_multiplier)
    if noise_multiplier <= 0:
        raise DPConfigError("a noised evaluation needs dp.evaluation_noise_multiplier > 0")
    return DPRelease(
        mechanism=MECHANISM_EVALUATION,
        sample_rate=1.0,
        noise_multiplier=float(noise_multiplier),
        steps=1,
        delta=delta,
    )


def count_noise_sd(noise_multiplier: float) -> float:
    """Standard deviation of the noise on each released count (σ times the sensitivity)."""
    return float(noise_multiplier) * COUNT_SENSITIVITY


def noised_counts(
    counts: Sequence[tuple[int, int]],
    release: DPRelease,
    *,
    seed: int | None = None,
) -> list[tuple[float, float]]:
    """``(correct_j, count_j)`` for every task, each plus Gaussian noise of sd σ·√2.

    ``release`` is what the site charged (:func:`evaluation_release`); the mechanism refuses any
    other. ``seed``: the site's research seed for this release (:mod:`.seeding`) or a test's;
    the default draws from OS entropy.
    """
    import torch

    if release.mechanism != MECHANISM_EVALUATION or (release.sample_rate, release.steps) != (1, 1):
        raise DPConfigError(f"noised_counts runs the evaluation release only, not {release}")
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    sd = count_noise_sd(release.noise_multiplier)
    noise = torch.randn(len(counts), 2, generator=generator, dtype=torch.float64) * sd
    return [
        (float(correct) + float(e[0]), float(count) + float(e[1]))
        for (correct, count), e in zip(counts, noise, strict=True)
    ]
