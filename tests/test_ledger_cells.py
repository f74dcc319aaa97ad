"""The ledger's rule for ε: the max over data cells of the releases touching each (parallel
composition), the universal cell composing with all; old lines without cells read as before."""

from __future__ import annotations

import json

import pytest

from fedcl.privacy.ledger import (
    DPRelease,
    LedgerError,
    PrivacyLedger,
    compose_epsilon,
)
from fedcl.privacy.ledger.cells import MAX_COMBINATIONS

DELTA = 1e-5
TRAIN_0 = DPRelease("dp-sgd", 0.1, 1.1, 200, DELTA, cells=("train:task-0",))
TRAIN_1 = DPRelease("dp-sgd", 0.05, 1.3, 300, DELTA, cells=("train:task-1",))
EVAL = DPRelease("evaluation", 1.0, 3.0, 1, DELTA, cells=("test:task-0", "test:task-1"))
ALL = DPRelease("drift", 1.0, 8.0, 1, DELTA)  # universal: composes with every cell


def _record(ledger: PrivacyLedger, release: DPRelease, run_id: str = "r", task: int = 0) -> None:
    ledger.record(release, run_id=run_id, task_index=task, server_round=1)


def test_epsilon_is_the_max_over_cells_of_their_sequential_composition(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for release in (TRAIN_0, TRAIN_0, TRAIN_1, EVAL, EVAL, EVAL, ALL):
        _record(ledger, release)
    cell_0 = compose_epsilon([TRAIN_0.history] * 2 + [ALL.history], DELTA)
    cell_1 = compose_epsilon([TRAIN_1.history, ALL.history], DELTA)
    test = compose_epsilon([EVAL.history] * 3 + [ALL.history], DELTA)
    sequential = compose_epsilon(ledger.history(), DELTA)
    spend = ledger.spend(DELTA, run_id="r")
    assert spend.epsilon == pytest.approx(max(cell_0, cell_1, test), rel=1e-12)
    assert spend.cell == "train:task-0" and cell_0 > max(cell_1, test)
    assert ledger.epsilon(DELTA) == spend.epsilon  # one run: lifetime = run
    assert spend.epsilon < sequential - 1.0  # the cells are what lowers it
    summary = ledger.summary(DELTA)
    assert summary.epsilon_lifetime == spend.epsilon and summary.cell == "train:task-0"
    assert summary.runs[0].epsilon == spend.epsilon and summary.runs[0].cell == "train:task-0"
    # The line names its cells; a universal line is written exactly as before cells.
    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert lines[0]["cells"] == ["train:task-0"] and lines[3]["cells"] == [
        "test:task-0",
        "test:task-1",
    ]
    assert "cells" not in lines[-1]
    assert ledger.entries()[3].release == EVAL  # read back as written


def test_a_ledger_without_cells_reads_as_the_sequential_composition(tmp_path) -> None:
    """Lines written before cells (schema 1, and 2 with a group size) are universal."""
    lines = [
        {"run_id": "old", "task_index": k, "server_round": k + 1, "mechanism": "dp-sgd",
         "sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 100, "delta": DELTA,
         "timestamp": "2026-01-01T00:00:00+00:00", "version": 1}
        for k in range(3)
    ]  # fmt: skip
    lines.append({**lines[0], "task_index": 3, "group_size": 2, "version": 2})
    (tmp_path / "privacy_ledger.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ledger = PrivacyLedger(tmp_path)
    assert all(e.cells == ("*",) for e in ledger.entries())
    history = [(1.0, 0.1, 100)] * 3 + [(1.0, 0.1, 100, 2)]
    assert ledger.epsilon(DELTA) == compose_epsilon(history, DELTA)
    assert ledger.epsilon(DELTA, run_id="old") == compose_epsilon(history, DELTA)
    assert ledger.spend(DELTA).cell == "*"
    # A new release in a cell composes with all the universal ones: never less than before.
    _record(ledger, TRAIN_0, run_id="old")
    assert ledger.epsilon(DELTA) == pytest.approx(
        compose_epsilon([*history, TRAIN_0.history], DELTA), rel=1e-12
    )


def test_a_bad_cells_field_names_the_file_and_line(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path)
    _record(ledger, TRAIN_0)
    line = json.loads(ledger.path.read_text())
    ledger.path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "cells": []}) + "\n")
    with pytest.raises(LedgerError, match=r"privacy_ledger.jsonl, line 2: cells must be"):
        ledger.entries()
    with pytest.raises(LedgerError, match="cells must be"):
        DPRelease("dp-sgd", 0.1, 1.0, 1, DELTA, cells=("",))


def test_cells_are_a_runs_own_and_the_lifetime_takes_one_cell_per_run(tmp_path) -> None:
    """Two runs may cut the data differently: a record is in one cell of each run, so the
    lifetime ε is the worst combination of one cell per run, not the max of either run."""
    ledger = PrivacyLedger(tmp_path)
    for run in ("a", "b"):
        _record(ledger, TRAIN_0, run)
        _record(ledger, TRAIN_1, run)
    worst = max(
        compose_epsilon([x.history, y.history], DELTA)
        for x in (TRAIN_0, TRAIN_1)
        for y in (TRAIN_0, TRAIN_1)
    )
    assert ledger.epsilon(DELTA) == pytest.approx(worst, rel=1e-12)
    assert ledger.epsilon(DELTA) > ledger.epsilon(DELTA, run_id="a")
    assert ledger.epsilon(DELTA) < compose_epsilon(ledger.history(), DELTA)


def test_many_runs_use_the_per_order_bound_between_exact_and_sequential(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path)
    runs = 0
    while 2**runs <= MAX_COMBINATIONS:  # 2 cells a run: beyond the exact enumeration
        _record(ledger, TRAIN_0, f"run-{runs}")
        _record(ledger, TRAIN_1, f"run-{runs}")
        runs += 1
    bound = ledger.epsilon(DELTA)
    exact = compose_epsilon([TRAIN_0.history] * runs, DELTA)  # cell 0 is the worse at every run
    assert exact <= bound + 1e-9 and bound < compose_epsilon(ledger.history(), DELTA)


def test_the_budget_is_checked_by_the_cells(tmp_path) -> None:
    """A budget between the worst cell and the sequential ε: a release in another cell fits."""
    ledger = PrivacyLedger(tmp_path)
    _record(ledger, TRAIN_0)
    cell = compose_epsilon([TRAIN_0.history], DELTA)
    both = compose_epsilon([TRAIN_0.history, TRAIN_0.history], DELTA)
    budget = (cell + both) / 2
    assert ledger.try_spend(
        TRAIN_1, budget=budget, run_id="r", task_index=1, server_round=2
    ).accepted
    refused = ledger.try_spend(TRAIN_0, budget=budget, run_id="r", task_index=0, server_round=3)
    assert not refused.accepted and refused.epsilon_after == pytest.approx(both, rel=1e-12)
    assert ledger.would_exceed(TRAIN_0, budget, DELTA, run_id="r") == (True, refused.epsilon_after)
