"""ε of a history of releases, composed by Opacus' own accountant; per-run summaries.

ε values do not add up, so the ledger never stores one: :func:`compose_epsilon` recomputes ε(δ)
from the raw mechanism parameters of every release asked about, and :func:`summarise` does it
for the whole history, each run and each task of a run.

A release of group size ``k > 1`` (its inputs can be ``k`` add/remove steps apart when the
site's data differs in one example, e.g. DP-SGD over a replay buffer) is composed with RDP group
privacy, :func:`group_rdp`; a history of group-size-1 releases goes to Opacus' accountant
unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from .rdp_analysis import RDP_ORDERS, rdp_analysis
from .records import (
    ACCOUNTANTS,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    RunSpend,
    TaskSpend,
)


def compose_epsilon(
    history: Iterable[tuple[float, ...]], delta: float, accountant: str = "rdp"
) -> float:
    """ε(δ) of a sequence of ``(noise_multiplier, sample_rate, steps[, group_size])`` releases.

    RDP (the default) computes what Opacus' ``RDPAccountant`` does for that history — the sum
    of Opacus' ``compute_rdp`` at its default orders, converted by Opacus' ``get_privacy_spent``
    — with each (σ, q)'s one-step curve cached (RDP is linear in the steps), so a site composing
    its whole history every round pays for each mechanism once. PRV goes to Opacus'
    ``PRVAccountant`` in its history format. Composition is commutative, so releases with equal
    (σ, q) are merged first. A release with σ = 0 gives ε = inf.

    A release with ``group_size > 1`` is composed at its group size (:func:`group_rdp`); the
    PRV accountant has no group form and is refused for such a history.
    """
    if not 0.0 < delta < 1.0:
        raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    merged = _merge(history)
    if not merged:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in merged):
        return math.inf
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": a history of only a few strongly noised
        # releases (a noised evaluation) is tightest beyond α = 63. The ε is still a valid
        # (looser) bound, and a site's log needs no warning per round for it.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _compose(merged, delta, accountant)


def _merge(history: Iterable[tuple[float, ...]]) -> dict[tuple[float, float, int], int]:
    merged: dict[tuple[float, float, int], int] = {}
    for sigma, q, steps, *rest in history:
        group = int(rest[0]) if rest else 1
        if group < 1:
            raise LedgerError(f"group_size must be >= 1, got {group!r}")
        if steps > 0:
            key = (float(sigma), float(q), group)
            merged[key] = merged.get(key, 0) + int(steps)
    return merged


def rdp_curve(history: Iterable[tuple[float, ...]]) -> np.ndarray:
    """Σ RDP ε(α) of ``history`` at the ledger's orders (:data:`RDP_ORDERS`); inf at σ = 0.

    For the per-order bounds of :mod:`.cells`; :func:`rdp_to_epsilon` converts it.
    """
    orders = np.array(RDP_ORDERS, dtype=float)
    merged = _merge(history)
    if any(sigma == 0.0 for sigma, _, _ in merged):
        return np.full(len(orders), math.inf)
    curve = np.zeros(len(orders))
    for (sigma, q, group), steps in merged.items():
        curve = curve + group_rdp(sigma, q, steps, group, orders)
    return curve


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """ε(δ) of an RDP curve at :data:`RDP_ORDERS`, by Opacus' ``get_privacy_spent``."""
    if not np.all(np.isfinite(rdp)):
        return math.inf
    if not np.any(rdp > 0):
        return 0.0
    orders = np.array(RDP_ORDERS, dtype=float)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis().get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _compose(merged: dict[tuple[float, float, int], int], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        # What RDPAccountant.get_privacy_spent computes (Σ compute_rdp at its DEFAULT_ALPHAS,
        # then Opacus' conversion), with each (σ, q)'s per-step curve computed once per process:
        # RDP is linear in the steps, and the fractional orders cost a series each. Opacus'
        # analysis module is used without importing the package (rdp_analysis.py: ~2 s).
        orders = np.array(RDP_ORDERS, dtype=float)
        rdp = sum(
            group_rdp(sigma, q, steps, group, orders) for (sigma, q, group), steps in merged.items()
        )
        eps, _ = rdp_analysis().get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)
    from opacus.accountants import PRVAccountant

    if any(group > 1 for _, _, group in merged):
        raise LedgerError(
            f"the {accountant} accountant cannot compose releases of group size > 1 "
            "(DP-SGD over a replay buffer); use accountant='rdp'"
        )
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q, _), steps in merged.items()]
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as err:
        # PRV's numerical domain does not cover every (σ, q, steps); RDP always applies.
        raise LedgerError(
            f"the {accountant} accountant cannot compose this history ({err}); use accountant='rdp'"
        ) from err


def group_rdp(
    noise_multiplier: float, sample_rate: float, steps: int, group_size: int, orders: np.ndarray
) -> np.ndarray:
    """RDP ε(α) of ``steps`` sampled Gaussian steps for inputs ``group_size`` records apart.

    Group size 1 is Opacus' ``compute_rdp`` (add/remove one record, Poisson sampling; the bound
    holds in both directions, Mironov, Talwar & Zhang 2019). For ``k > 1`` the chain
    ``S = S_0, S_1, …, S_k = S'`` of add/remove steps and the weak triangle inequality of Rényi
    divergence (Mironov 2017, Prop. 11, p = q = 2) give, at every order α > 1::

        ε_k(α) ≤ (α - ½)/(α - 1) · ε_{k-1}(2α) + ε_1(2α - 1)

    applied to the whole ``steps``-fold (adaptive) composition. It is an upper bound, never the
    exact curve: for q = 1 and k = 2 it is ``(2α - 1)² / (2(α - 1)σ²)`` against the exact
    ``2α/σ²``; for small q roughly two to three times the ε of group size 1.
    """
    orders = np.asarray(orders, dtype=float)
    if group_size == 1:
        return _step_rdp(float(noise_multiplier), float(sample_rate), tuple(orders)) * steps
    inner = group_rdp(noise_multiplier, sample_rate, steps, group_size - 1, 2 * orders)
    last = group_rdp(noise_multiplier, sample_rate, steps, 1, 2 * orders - 1)
    return (orders - 0.5) / (orders - 1) * inner + last


@lru_cache(maxsize=4096)
def _step_rdp(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus' ``compute_rdp`` of one step (``compute_rdp`` is that times ``steps``), cached."""
    rdp = np.asarray(
        rdp_analysis().compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
        ),
        dtype=float,
    )
    rdp.flags.writeable = False
    return rdp


def summarise(
    entries: Sequence[LedgerEntry],
    delta: float,
    *,
    budget: float | None = None,
    accountant: str = "rdp",
    path: str = "",
) -> LedgerSummary:
    """Per run (and per task inside it): releases, steps, ε alone; plus lifetime ε.

    Every ε follows the cell rule (:func:`.cells.cell_spend`: the max over data cells), of the
    task's releases alone, the run's, and the whole history's.
    """
    from .cells import cell_spend, entry_items

    runs: list[RunSpend] = []
    for run_id in dict.fromkeys(e.run_id for e in entries):
        mine = [e for e in entries if e.run_id == run_id]
        tasks = []
        for task in sorted({e.task_index for e in mine}):
            of_task = [e for e in mine if e.task_index == task]
            tasks.append(
                TaskSpend(
                    run_id=run_id,
                    task_index=task,
                    releases=len(of_task),
                    steps=sum(e.steps for e in of_task),
                    epsilon=cell_spend(entry_items(of_task), delta, accountant).epsilon,
                )
            )
        spent = cell_spend(entry_items(mine), delta, accountant)
        runs.append(
            RunSpend(
                run_id=run_id,
                releases=len(mine),
                steps=sum(e.steps for e in mine),
                epsilon=spent.epsilon,
                first=mine[0].timestamp,
                last=mine[-1].timestamp,
                tasks=tasks,
                cell=spent.cell,
            )
        )
    lifetime = cell_spend(entry_items(entries), delta, accountant)
    return LedgerSummary(
        path=path,
        delta=delta,
        accountant=accountant,
        releases=len(entries),
        steps=sum(e.steps for e in entries),
        epsilon_lifetime=lifetime.epsilon,
        budget=budget,
        runs=runs,
        cell=lifetime.cell,
    )
