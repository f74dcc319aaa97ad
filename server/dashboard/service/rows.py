"""A run's rows as the dashboard last read them, brought up to date a round at a time.

The results document and the run page's charts are computed from all of a run's rows (a
200-round, 30-site run: ~19,000 metrics, 12,000 participations, 6,000 privacy reports). Reading
them all again after every round took most of a second (the query and one pydantic snapshot
per row), on the request a running run's poll makes after each round. So the rows are kept per
run, with the run's fingerprint they were read at, and when the fingerprint changed only some
rounds are read again (:data:`TAIL` newest ones, plus any new round or one whose row changed):

* a new round's rows are written while it runs, and its evaluation (one round trip per round)
  and a culprit found after it completed are written during the next round: both are in the
  tail;
* a round reset after a coordinator restart, or recounted after a rejection, changes its own
  row (status, counts), so it is read again wherever it is.

The fast path never decides alone that nothing else changed: the rows it assembles must have
the same count and newest id, table by table, as the registry's fingerprint says the run has
(:meth:`~fedcl.server.registry.Registry.run_fingerprint`); otherwise (a row added to or deleted
from an older round, run-level rows, a fingerprint this module does not know how to read) every
row is read again. What neither sees: a row of an older round rewritten in place without its
round's row changing (same count, same ids). The registry's writers do not do that today (a
retried or rejected participation is rewritten while its round runs, or with a recount); the
whole-document cache this replaces only caught it at the run's next change.

What is held is plain registry snapshots (immutable); the registry stays the only source of
truth, and a dashboard restarted reads the same rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedcl.config.vocabulary import RunStatus
from fedcl.server.registry import (
    MetricInfo,
    ParticipationInfo,
    PrivacyInfo,
    Registry,
    RoundInfo,
    RunFingerprint,
)
from fedcl.server.results import RunRows, read_run_rows

from .cache import _fingerprint, per_registry

TAIL = 2  # newest rounds read again on every change (see the module docstring)
# Runs whose rows are held. A 200-round, 30-site run's rows take ~50 MB as snapshots, so
# besides the running runs (what changes, what is polled) only the run read last is kept: its
# page builds the results and then the charts from the same rows.
MAX_RUNS = 4
MAX_FINISHED = 1
# The tables whose rows are held, checked against the fingerprint's (count, newest id).
_TABLES = ("participations", "metrics", "privacy")


def fingerprint_marks(fingerprint: Any) -> dict[str, tuple[int, int | None]] | None:
    """(row count, newest id) of the tables held here, from a run fingerprint (None: not a
    :class:`~fedcl.server.registry.RunFingerprint`, so the fast path is not taken)."""
    if not isinstance(fingerprint, RunFingerprint):
        return None
    return {
        "participations": (fingerprint.participations, fingerprint.newest_participation),
        "metrics": (fingerprint.metrics, fingerprint.newest_metric),
        "privacy": (fingerprint.privacy, fingerprint.newest_privacy),
    }


def _running(fingerprint: Any) -> bool:
    """Whether the run was running at ``fingerprint``."""
    return isinstance(fingerprint, RunFingerprint) and fingerprint.status == RunStatus.RUNNING


def _marks_of(rows: Sequence[Any]) -> tuple[int, int | None]:
    return len(rows), max((r.id for r in rows), default=None)


def rows_marks(rows: RunRows) -> dict[str, tuple[int, int | None]]:
    """(row count, newest id) of the tables in ``rows``, to compare with the fingerprint's."""
    return {
        "participations": _marks_of(rows.participations),
        "metrics": _marks_of(rows.metrics),
        "privacy": _marks_of(rows.privacy),
    }


@dataclass(frozen=True)
class _Held:
    """One run's rows at one fingerprint, grouped by round (``None``: run-level rows), with
    each group's newest id (so the check against the fingerprint does not scan every row)."""

    fingerprint: Any
    rounds: dict[int, RoundInfo]
    metrics: dict[int | None, list[MetricInfo]]
    participations: dict[int, list[ParticipationInfo]]
    privacy: dict[int | None, list[PrivacyInfo]]
    newest: dict[str, dict[Any, int | None]]
    rows: RunRows

    def marks(self) -> dict[str, tuple[int, int | None]]:
        """(row count, newest id) per table, from the groups."""
        groups = {
            "participations": self.participations,
            "metrics": self.metrics,
            "privacy": self.privacy,
        }
        return {
            table: (
                sum(len(g) for g in groups[table].values()),
                max((i for i in self.newest[table].values() if i is not None), default=None),
            )
            for table in _TABLES
        }


def _newest(groups: dict[Any, list[Any]]) -> dict[Any, int | None]:
    return {key: _marks_of(rows)[1] for key, rows in groups.items()}


def _by_round(rows: Sequence[Any]) -> dict[Any, list[Any]]:
    """Rows grouped by their ``round_id`` (``None``: run-level rows), in their order."""
    groups: dict[Any, list[Any]] = {}
    for row in rows:
        groups.setdefault(row.round_id, []).append(row)
    return groups


def _group(rows: RunRows, fingerprint: Any) -> _Held:
    metrics = _by_round(rows.metrics)
    parts = _by_round(rows.participations)
    privacy = _by_round(rows.privacy)
    newest = {
        "participations": _newest(parts),
        "metrics": _newest(metrics),
        "privacy": _newest(privacy),
    }
    return _Held(fingerprint, {r.id: r for r in rows.rounds}, metrics, parts, privacy, newest, rows)


def _assemble(
    rounds: Sequence[RoundInfo],
    metrics: dict[int | None, list[MetricInfo]],
    parts: dict[int, list[ParticipationInfo]],
    privacy: dict[int | None, list[PrivacyInfo]],
) -> RunRows:
    """The rows in the facade's order: rounds by server round, run-level metrics first,
    privacy reports by id."""
    return RunRows(
        rounds=list(rounds),
        metrics=[*metrics.get(None, []), *(m for r in rounds for m in metrics.get(r.id, []))],
        participations=[p for r in rounds for p in parts.get(r.id, [])],
        privacy=sorted((e for rows in privacy.values() for e in rows), key=lambda e: e.id),
    )


class RowStore:
    """run id -> its rows at a fingerprint; least recently used dropped first.

    ``incremental=False`` reads every row on every change (what the benchmark compares with).
    The counters are what the tests read: they fail when the fast path stops being taken.
    """

    def __init__(
        self,
        *,
        incremental: bool = True,
        max_runs: int = MAX_RUNS,
        max_finished: int = MAX_FINISHED,
    ) -> None:
        self.incremental = incremental
        self.max_runs = max_runs
        self.max_finished = max_finished
        self._held: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}
        self.full_reads = 0  # every row of a run read
        self.folds = 0  # brought up to date from the rounds that changed
        self.rounds_read = 0  # rounds whose metrics and participations were read again
        self.fallbacks = 0  # folds whose rows did not add up to the fingerprint's counts

    def rows(self, registry: Registry, run_id: str) -> RunRows:
        """The run's rows as of the fingerprint of this request."""
        fingerprint = _fingerprint(registry, run_id)
        with self._lock:
            run_lock = self._run_locks.setdefault(run_id, threading.Lock())
        with run_lock:  # one reader per run brings it up to date; the others wait and reuse it
            with self._lock:
                held = self._held.get(run_id)
            if held is not None and held.fingerprint == fingerprint:
                with self._lock:
                    self._held.move_to_end(run_id)
                return held.rows
            new = None
            if held is not None and self.incremental:
                new = self._fold(registry, run_id, fingerprint, held)
                if new is None:  # a write may have landed between the fingerprint and the reads
                    fresh = registry.run_fingerprint(run_id)
                    if fresh != fingerprint:
                        new = self._fold(registry, run_id, fresh, held)
            if new is None:
                new = _group(read_run_rows(registry, run_id), fingerprint)
                self.full_reads += 1
            with self._lock:
                self._held[run_id] = new
                self._held.move_to_end(run_id)
                self._evict()
            return new.rows

    def held_runs(self) -> list[str]:
        """The runs whose rows are held, least recently used first."""
        with self._lock:
            return list(self._held)

    def _evict(self) -> None:
        """Drop the least recently used runs beyond the bounds (call with ``_lock`` held)."""
        finished = [k for k, h in self._held.items() if not _running(h.fingerprint)]
        for run_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._held[run_id]
            self._run_locks.pop(run_id, None)
        while len(self._held) > self.max_runs:
            dropped, _ = self._held.popitem(last=False)
            self._run_locks.pop(dropped, None)

    def _fold(self, registry: Registry, run_id: str, fingerprint: Any, held: _Held) -> _Held | None:
        """``held`` brought up to ``fingerprint`` by reading the rounds that changed, or None
        when the result would not match the fingerprint's counts (then every row is read)."""
        marks = fingerprint_marks(fingerprint)
        if marks is None:
            return None
        rounds = registry.list_rounds(run_id)
        ids = {r.id for r in rounds}
        if not ids.issuperset(k for k in held.rounds):
            self.fallbacks += 1
            return None  # a round deleted: nothing in the registry does that today
        tail = {r.id for r in rounds[len(rounds) - TAIL :]}
        metrics = dict(held.metrics)
        parts = dict(held.participations)
        privacy = dict(held.privacy)
        newest = {table: dict(ids) for table, ids in held.newest.items()}
        for r in rounds:
            if r.id in tail or held.rounds.get(r.id) != r:
                read = {
                    "metrics": registry.list_metrics(run_id, round_id=r.id),
                    "participations": registry.list_participations(run_id, round_id=r.id),
                    "privacy": registry.list_privacy(run_id, round_id=r.id),
                }
                metrics[r.id], parts[r.id], privacy[r.id] = (
                    read["metrics"], read["participations"], read["privacy"]
                )  # fmt: skip
                for table, rows_read in read.items():
                    newest[table][r.id] = _marks_of(rows_read)[1]
                self.rounds_read += 1
        rows = _assemble(rounds, metrics, parts, privacy)
        new = _Held(fingerprint, {r.id: r for r in rounds}, metrics, parts, privacy, newest, rows)
        if new.marks() != marks:
            self.fallbacks += 1
            return None
        self.folds += 1
        return new


#: The row store of one open registry.
row_store: Callable[[Registry], RowStore] = per_registry(RowStore)


def run_rows(registry: Registry, run_id: str) -> RunRows:
    """The run's rows, up to date with the registry (shared between requests: do not mutate)."""
    return row_store(registry).rows(registry, run_id)
