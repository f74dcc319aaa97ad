"""The dashboard's incremental rows (``server/dashboard/service/rows.py``) against a full read.

A running run is recorded the way the coordinator records it (one round trip per round: round
r's evaluation arrives with round r+1's replies, after round r completed), through the registry
API. After each change the rows the dashboard brought up to date, the results document built
from them and the run page's chart data must equal what a full read builds (``build_results``
straight from the registry; a second dashboard that reads every row). The counters say which
path was taken, so a fast path that silently fell back to full reads fails here too; speed
itself is measured only in ``benchmarks/dashboard.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from fedcl.server.dashboard.auth import Principal
from fedcl.server.dashboard.service import run_charts_json
from fedcl.server.dashboard.service.cache import _REQUEST, results_of
from fedcl.server.dashboard.service.charts import MODEL_AGREEMENT
from fedcl.server.dashboard.service.rows import (
    TAIL,
    RowStore,
    fingerprint_marks,
    row_store,
    rows_marks,
    run_rows,
)
from fedcl.server.registry import MetricRow, Registry
from fedcl.server.registry.participations import ParticipationRow
from fedcl.server.results import build_results, read_run_rows

RUN = "rows-run"
SITES = [f"site-{i}" for i in range(4)]
TASKS = 3
PER_TASK = 2
ADMIN = Principal(1, "admin", "admin")
SITE_1 = Principal(2, "site-1", "site:site-1")


def _task(r: int) -> int:
    return min((r - 1) // PER_TASK, TASKS - 1)


def _train(registry: Registry, r: int) -> int:
    """Round r begins and its sites reply: site-0 fails every third round, site-3 refuses
    from round 5 (budget), the others train and report ε; the round completes."""
    rid = registry.begin_round(
        RUN, task_index=_task(r), round_in_task=(r - 1) % PER_TASK, server_round=r
    )
    rows = []
    for site in SITES:
        if site == "site-0" and r % 3 == 0:
            rows.append(ParticipationRow(site, "train", "failed", 0, "RuntimeError: out of memory"))
        elif site == "site-3" and r >= 5:
            rows.append(ParticipationRow(site, "train", "refused", 0, "privacy budget exhausted"))
        else:
            rows.append(ParticipationRow(site, "train", "ok", 100 + r))
            registry.record_privacy(
                RUN, rid, site, epsilon_run=0.1 * r, epsilon_lifetime=1.0 + 0.1 * r, delta=1e-5,
                budget=2.0,
            )  # fmt: skip
    registry.record_participations(rid, rows)
    registry.record_metrics(RUN, rid, [MetricRow(MODEL_AGREEMENT, float(r != 4))])
    registry.complete_round(rid, seconds=1.0 + r, bytes_up=1000 * r, bytes_down=2000 * r)
    return rid


def _evaluate(registry: Registry, rid: int, r: int) -> None:
    """Round r's evaluation (every site, every task seen so far), recorded after it completed."""
    registry.record_participations(rid, [ParticipationRow(s, "evaluate", "ok", 50) for s in SITES])
    rows = []
    for j in range(_task(r) + 1):
        acc = 0.4 + 0.3 * (j == _task(r)) + 0.01 * r
        rows.append(MetricRow("accuracy", acc, task_index=j))
        rows += [MetricRow("accuracy", acc - 0.01 * k, site, j) for k, site in enumerate(SITES)]
    registry.record_metrics(RUN, rid, rows)


class Run:
    """The run as the coordinator grows it, round by round."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.ids: dict[int, int] = {}
        registry.create_run(
            RUN,
            name="rows",
            scenario="synthetic",
            config={"dp": {"enabled": True, "evaluation": "clear"}},
            tasks=[f"task-{t}" for t in range(TASKS)],
        )
        registry.record_metrics(
            RUN, None, [MetricRow("baseline_accuracy", 0.1, task_index=j) for j in range(TASKS)]
        )

    def next_round(self) -> None:
        """A new round trains; the previous one's evaluation arrives with its replies."""
        r = len(self.ids) + 1
        self.ids[r] = _train(self.registry, r)
        if r > 1:
            _evaluate(self.registry, self.ids[r - 1], r - 1)


@pytest.fixture
def run(registry: Registry) -> Iterator[Run]:
    grown = Run(registry)
    for _ in range(3):
        grown.next_round()
    yield grown


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)  # key order kept: results.json is written in order


def _charts(registry: Registry, principal: Principal) -> dict[str, Any]:
    run = registry.get_run(RUN)
    assert run is not None
    body = json.loads(run_charts_json(registry, run, principal))
    body.pop("run")  # the badge's idle seconds age with the clock
    return body


def assert_same_as_a_full_read(registry: Registry) -> None:
    """Rows, results document and charts (admin and a site token) equal a full read's."""
    rows = run_rows(registry, RUN)
    assert rows == read_run_rows(registry, RUN)
    assert _dumps(results_of(registry, RUN)) == _dumps(build_results(registry, RUN))
    with Registry.open(registry.url) as fresh:  # a second dashboard: reads every row once
        for principal in (ADMIN, SITE_1):
            assert _charts(registry, principal) == _charts(fresh, principal)
        assert row_store(fresh).full_reads == 1 and row_store(fresh).folds == 0


def test_appended_rounds_are_folded_in_and_equal_a_full_read(run: Run) -> None:
    store = row_store(run.registry)
    assert_same_as_a_full_read(run.registry)
    assert (store.full_reads, store.folds) == (1, 0)
    for n in range(1, 6):
        run.next_round()
        assert_same_as_a_full_read(run.registry)
        # The fast path, not a full read: only the newest rounds were read again.
        assert (store.full_reads, store.folds, store.fallbacks) == (1, n, 0)
        assert store.rounds_read == TAIL * n
    results = results_of(run.registry, RUN)
    assert [r["server_round"] for r in results["rounds"]] == list(range(1, 9))
    assert results["sites"]["site-0"]["failed_rounds"] == [3, 6]
    assert results["sites"]["site-3"]["refused_rounds"] == [5, 6, 7, 8]
    assert results["sites"]["site-1"]["epsilon"] == pytest.approx(0.8)
    # Task 1's row is its last round's (4) evaluation; task 2's last round (8) is not evaluated.
    assert results["accuracy_matrix"][1][:2] == pytest.approx([0.44, 0.74])
    assert results["accuracy_matrix"][1][2] is None
    assert results["accuracy_matrix"][2] == [None, None, None]
    charts = _charts(run.registry, ADMIN)
    assert charts["model_hash"]["disagreed_rounds"] == [4]
    assert {a["kind"] for a in charts["alerts"]} == {"accuracy_drop", "budget"}


def test_nothing_changed_reads_nothing(run: Run) -> None:
    store = row_store(run.registry)
    first = run_rows(run.registry, RUN)
    assert run_rows(run.registry, RUN) is first
    assert (store.full_reads, store.folds, store.rounds_read) == (1, 0, 0)


def test_a_status_change_is_folded_without_reading_rows(run: Run) -> None:
    store = row_store(run.registry)
    assert_same_as_a_full_read(run.registry)
    run.registry.set_run_status(RUN, "failed", "coordinator lost its database")
    assert_same_as_a_full_read(run.registry)
    results = results_of(run.registry, RUN)
    assert (results["status"], results["reason"]) == ("failed", "coordinator lost its database")
    assert (store.full_reads, store.folds, store.rounds_read) == (1, 1, TAIL)


def test_an_older_round_recounted_after_a_rejection_is_read_again(run: Run) -> None:
    """A culprit found later turns round 1's ok into rejected and recounts round 1: its own
    row changed, so it is read again although it is outside the tail."""
    registry, store = run.registry, row_store(run.registry)
    run.next_round()
    run.next_round()
    assert_same_as_a_full_read(registry)
    registry.record_participations(
        run.ids[1], [ParticipationRow("site-2", "train", "rejected", 0, "corrupt share")]
    )
    registry.recount_round(run.ids[1])
    registry.audit("round.culprit", "site-2 sent a corrupt share", run_id=RUN)
    assert_same_as_a_full_read(registry)
    assert (store.full_reads, store.fallbacks) == (1, 0)
    assert store.rounds_read == TAIL + 1  # the tail and round 1
    assert results_of(registry, RUN)["rounds"][0]["failures"] == 1


def test_rows_added_to_an_older_round_fall_back_to_a_full_read(run: Run) -> None:
    """A row the fold cannot see (round 1 unchanged, outside the tail; a run-level row) makes
    the counts differ from the fingerprint's: every row is read again, never a stale page."""
    registry, store = run.registry, row_store(run.registry)
    run.next_round()
    assert_same_as_a_full_read(registry)
    registry.record_metrics(RUN, run.ids[1], [MetricRow("accuracy", 0.99, task_index=0)])
    assert_same_as_a_full_read(registry)
    assert (store.full_reads, store.fallbacks) == (2, 1)
    assert results_of(registry, RUN)["rounds"][0]["accuracy"][0] == pytest.approx(0.99)
    registry.record_metrics(RUN, None, [MetricRow("baseline_accuracy", 0.2, task_index=0)])
    assert_same_as_a_full_read(registry)
    assert (store.full_reads, store.fallbacks) == (3, 2)
    assert results_of(registry, RUN)["baseline_accuracy"][0] == pytest.approx(0.2)


def test_the_fingerprint_counts_what_the_rows_hold(run: Run) -> None:
    """The fold's check reads (count, newest id) per table from the fingerprint by name; a value
    that is not a RunFingerprint turns the fast path off."""
    marks = fingerprint_marks(run.registry.run_fingerprint(RUN))
    assert marks == rows_marks(read_run_rows(run.registry, RUN))
    assert marks["participations"][0] == 3 * len(SITES) + 2 * len(SITES)  # 3 trains, 2 evals
    assert fingerprint_marks((1, 2, 3)) is None


def test_a_store_without_the_fast_path_reads_everything(run: Run) -> None:
    """What the benchmark compares with: the same rows, every change a full read."""
    store = RowStore(incremental=False)
    before = store.rows(run.registry, RUN)
    run.next_round()
    after = store.rows(run.registry, RUN)
    assert after == read_run_rows(run.registry, RUN) and after != before
    assert (store.full_reads, store.folds) == (2, 0)


def test_only_running_runs_and_the_last_finished_one_are_held(run: Run) -> None:
    """A large run's rows are ~50 MB of snapshots: a finished run's are dropped once another
    finished run is read (its documents stay cached against its fingerprint)."""
    registry, store = run.registry, row_store(run.registry)
    for name in ("done-a", "done-b"):
        registry.create_run(name, name=name, scenario="synthetic", config={}, tasks=["t"])
        registry.set_run_status(name, "completed")
    run_rows(registry, RUN)
    run_rows(registry, "done-a")
    assert store.held_runs() == [RUN, "done-a"]
    run_rows(registry, "done-b")
    assert store.held_runs() == [RUN, "done-b"]
    assert results_of(registry, "done-a")["status"] == "completed"
    assert store.held_runs() == [RUN, "done-a"]


def test_a_write_between_the_fingerprint_and_the_reads_is_folded_at_a_fresh_fingerprint(
    run: Run,
) -> None:
    """A poll reads the fingerprint (once per request), then a site's evaluation lands, then the
    poll reads the newest rounds: they hold more than that fingerprint counts. The fold is tried
    again at a fresh fingerprint instead of reading every row."""
    registry, store = run.registry, row_store(run.registry)
    run_rows(registry, RUN)
    r = len(run.ids) + 1
    run.ids[r] = _train(registry, r)
    token = _REQUEST.set({RUN: registry.run_fingerprint(RUN)})  # what the request read first
    try:
        _evaluate(registry, run.ids[r - 1], r - 1)  # lands after it
        rows = run_rows(registry, RUN)
    finally:
        _REQUEST.reset(token)
    assert rows == read_run_rows(registry, RUN)
    assert (store.full_reads, store.folds, store.fallbacks) == (1, 1, 1)
    assert run_rows(registry, RUN) is rows  # held at the fresh fingerprint: nothing to read
