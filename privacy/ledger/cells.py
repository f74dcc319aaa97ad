"""The one rule for a site's ε: parallel composition over disjoint data cells.

A site's data is partitioned by each record's *own* attributes (its task, by class, domain or
explicit task id; its train-vs-test split): a *cell* such as ``"train:task-2"`` or
``"test:task-0"``. Every ledger release names the cells whose records it reads. Under
add/remove-one-record adjacency a record ``x`` of cell ``c`` changes only the releases that read
``c``; every other release depends on ``x`` at most through outputs released before it
(post-processing), so by adaptive parallel composition ``x``'s privacy loss is the composition of
the releases touching ``c`` alone. The site's guarantee is the worst record's:

    ε = max over cells c of ε(releases touching c)

A release over all the site's data, or an entry written before cells existed, touches the
*universal* cell :data:`UNIVERSAL`, which composes with every cell: a ledger of universal
entries gives exactly the sequential ε of its whole history (backward compatible, and the
conservative fallback whenever a release's cells are not known to be disjoint).

**Cells are scoped to a run.** Two runs may cut the same data into different tasks, so a cell
name means nothing outside its run. A record lies in one cell of each run, so over the
lifetime its loss composes one cell per run: the ledger takes the worst combination (exact
while the runs' distinct cells multiply to at most :data:`MAX_COMBINATIONS`; beyond that, with
RDP, the per-order maximum over each run's cells summed over runs, a valid upper bound; with
PRV, the whole history composed sequentially).

Opacus' accountant still composes each cell's history (:func:`~.compose.compose_epsilon`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .compose import compose_epsilon, rdp_curve, rdp_to_epsilon
from .records import UNIVERSAL, DPRelease, LedgerEntry

#: Most cell combinations (one per run) the lifetime ε enumerates exactly.
MAX_COMBINATIONS = 256

History = tuple[float, ...]
#: ``(run id, cells, Opacus history tuple)``: what the rule needs of one release.
Item = tuple[str, tuple[str, ...], History]


@dataclass(frozen=True)
class CellSpend:
    """ε of a set of releases and the cell where it is reached (``"*"``: sequential)."""

    epsilon: float
    cell: str = UNIVERSAL


def entry_items(entries: Iterable[LedgerEntry]) -> list[Item]:
    """The ledger entries as :data:`Item` s."""
    return [(e.run_id, e.cells, e.release.history) for e in entries]


def release_item(release: DPRelease, run_id: str) -> Item:
    """A release not yet recorded (what a charge would add), as an :data:`Item`."""
    return (run_id, release.cells, release.history)


def run_cells(items: Sequence[Item]) -> dict[str, list[History]]:
    """One run's histories per cell, the universal releases in each (distinct histories once)."""
    universal = [h for _run, cells, h in items if UNIVERSAL in cells]
    named = sorted({c for _run, cells, _h in items for c in cells if c != UNIVERSAL})
    if not named:
        return {UNIVERSAL: universal}
    out: dict[str, list[History]] = {}
    seen: set[tuple] = set()
    for cell in named:
        history = universal + [h for _run, cells, h in items if cell in cells]
        key = tuple(sorted(history))
        if key not in seen:  # cells with the same releases (e.g. every test cell) count once
            seen.add(key)
            out[cell] = history
    return out


def cell_spend(items: Iterable[Item], delta: float, accountant: str = "rdp") -> CellSpend:
    """ε(δ) of ``items`` under the rule above (max over cells; one cell per run over runs)."""
    items = list(items)
    if not items:
        return CellSpend(0.0)
    runs = list(dict.fromkeys(run for run, _c, _h in items))
    per_run = [run_cells([i for i in items if i[0] == run]) for run in runs]
    if math.prod(len(cells) for cells in per_run) <= MAX_COMBINATIONS:
        best = CellSpend(-1.0)
        for combo in itertools.product(*(cells.items() for cells in per_run)):
            history = [h for _cell, histories in combo for h in histories]
            eps = compose_epsilon(history, delta, accountant)
            if eps > best.epsilon:
                best = CellSpend(eps, combo[-1][0])
        return best
    if accountant != "rdp":  # no per-order form: the sequential composition, always valid
        return CellSpend(compose_epsilon([h for _r, _c, h in items], delta, accountant))
    curves = [
        np.max([rdp_curve(histories) for histories in cells.values()], axis=0) for cells in per_run
    ]
    return CellSpend(rdp_to_epsilon(np.sum(curves, axis=0), delta))
