"""What the dashboard built from a run, kept until the run changes (one fingerprint query).

A 200-round, 30-site run has ~30,000 metric rows and ~12,000 participations: the results
document and the run page's chart data took seconds to rebuild, and the page rebuilt them on
every view and every poll. Each built value is stored with the run's
:meth:`~fedcl.server.registry.Registry.run_fingerprint`, so a poll between two rounds costs one
small query, and the first request after a round computes the values again from the run's rows
(:mod:`.rows` reads only the rounds that changed, not all ~37,000 rows). The cache
holds the newest value per (run, what) only and is bounded; the registry stays the only source
of truth (a dashboard restarted, or a second one beside it, builds the same values).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from fedcl.server.registry import Registry

T = TypeVar("T")
MAX_ENTRIES = 256
# A read request's fingerprints, so the several cached pieces one page needs cost one query.
_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("fedcl_dashboard_read", default=None)


class ReadScope:
    """ASGI middleware: within one GET (or HEAD) request a run's fingerprint is read once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        token = _REQUEST.set({})
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST.reset(token)


def _fingerprint(registry: Registry, run_id: str) -> Any:
    memo = _REQUEST.get()
    if memo is None:
        return registry.run_fingerprint(run_id)
    if run_id not in memo:
        memo[run_id] = registry.run_fingerprint(run_id)
    return memo[run_id]


class RunCache:
    """(run, key) -> (fingerprint, value), least recently used dropped first."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._items: OrderedDict[tuple[str, Hashable], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.builds = 0  # how many values were (re)built: what the tests and benchmark read

    def get(self, registry: Registry, run_id: str, key: Hashable, build: Callable[[], T]) -> T:
        fingerprint = _fingerprint(registry, run_id)
        slot = (run_id, key)
        with self._lock:
            hit = self._items.get(slot)
            if hit is not None and hit[0] == fingerprint:
                self._items.move_to_end(slot)
                return hit[1]
        value = build()
        with self._lock:
            self.builds += 1
            self._items[slot] = (fingerprint, value)
            self._items.move_to_end(slot)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return value


def per_registry(factory: Callable[[], T]) -> Callable[[Registry], T]:
    """One object per open registry (the dashboard opens one per app), made on first use and
    dropped with the registry."""
    objects: weakref.WeakKeyDictionary[Registry, T] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def of(registry: Registry) -> T:
        with lock:
            found = objects.get(registry)
            if found is None:
                found = objects[registry] = factory()
            return found

    return of


#: The cache of one open registry.
run_cache: Callable[[Registry], RunCache] = per_registry(RunCache)


def cached(registry: Registry, run_id: str, key: Hashable, build: Callable[[], T]) -> T:
    return run_cache(registry).get(registry, run_id, key, build)


def results_of(registry: Registry, run_id: str) -> dict[str, Any]:
    """``build_results`` of the run, rebuilt only when the run changed.

    Callers must not mutate it (it is shared between requests).
    """
    from fedcl.server.results import build_results

    from .rows import run_rows  # the rows read again only for the rounds that changed

    return cached(
        registry,
        run_id,
        "results",
        lambda: build_results(registry, run_id, rows=run_rows(registry, run_id)),
    )
