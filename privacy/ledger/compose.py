"""ε of a history of releases, composed by Opacus' own accountant; per-run summaries.

ε values do not add up, so the ledger never stores one: :func:`compose_epsilon` recomputes ε(δ)
from the raw mechanism parameters of every release asked about, and :func:`summarise` does it
for the whole history, each run and each task of a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .records import (
    ACCOUNTANTS,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    RunSpend,
    TaskSpend,
)


def compose_epsilon(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε(δ) of a sequence of ``(noise_multiplier, sample_rate, steps)`` releases.

    The history is handed to Opacus' own accountant in its own history format, so the ledger
    reports exactly what Opacus would after taking those steps. Composition is commutative, so
    releases with equal (σ, q) are merged first (fewer terms; exact for RDP, and PRV's cost
    grows with the number of distinct mechanisms). A release with σ = 0 gives ε = inf.
    """
    if not 0.0 < delta < 1.0:
        raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0
    if any(sigma == 0.0 for sigma, _ in merged):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as err:
        # PRV's numerical domain does not cover every (σ, q, steps); RDP always applies.
        raise LedgerError(
            f"the {accountant} accountant cannot compose this history ({err}); use accountant='rdp'"
        ) from err


def summarise(
    entries: Sequence[LedgerEntry],
    delta: float,
    *,
    budget: float | None = None,
    accountant: str = "rdp",
    path: str = "",
) -> LedgerSummary:
    """Per run (and per task inside it): releases, steps, ε alone; plus lifetime ε."""
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
                    epsilon=compose_epsilon(
                        [e.release.history for e in of_task], delta, accountant
                    ),
                )
            )
        runs.append(
            RunSpend(
                run_id=run_id,
                releases=len(mine),
                steps=sum(e.steps for e in mine),
                epsilon=compose_epsilon([e.release.history for e in mine], delta, accountant),
                first=mine[0].timestamp,
                last=mine[-1].timestamp,
                tasks=tasks,
            )
        )
    return LedgerSummary(
        path=path,
        delta=delta,
        accountant=accountant,
        releases=len(entries),
        steps=sum(e.steps for e in entries),
        epsilon_lifetime=compose_epsilon([e.release.history for e in entries], delta, accountant),
        budget=budget,
        runs=runs,
    )
