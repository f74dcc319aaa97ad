"""What every part of the registry facade shares: one short transaction per call, row lookups.

Short transactions matter on SQLite: the coordinator is the only writer, and a CLI or dashboard
reading the same file (WAL mode) must never wait on a transaction the coordinator left open
across a Flower round. The lookups turn a missing or mismatched id into a
:class:`RegistryError` that names it, the same way for every aggregate.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .engine import error_reason
from .errors import RegistryError
from .models import Round, Run, Site, utcnow
from .validation import check_site_id


class RegistryCore:
    """The engine, its sessions and the artifacts folder; the aggregates' mixins build on it."""

    def __init__(self, engine: Engine, *, url: str, artifacts_dir: Path) -> None:
        """Use :meth:`Registry.open`; this only wires an already-migrated engine."""
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._closed = False
        self._batch = threading.local()  # this thread's open batch session, if any
        self.url = url
        self.artifacts_dir = artifacts_dir

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Session]:
        """One short transaction; database outages surface as :class:`RegistryError`."""
        if self._closed:
            raise RegistryError(f"registry at {self.url} is closed")
        open_batch = getattr(self._batch, "session", None)
        if open_batch is not None:  # inside batch(): the calls share its transaction
            yield open_batch
            return
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            reason = error_reason(exc, self._engine.url.password)
            raise RegistryError(f"registry at {self.url}: {reason}") from exc

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Every registry call of this thread inside the block commits as one transaction.

        The coordinator records a round's replies (participations, privacy, metrics, the
        version, completion) in one batch after the round's replies are in, never across a
        Flower round trip, so readers of the same SQLite file wait at most that long: one commit
        per round instead of one per row (docs/DESIGN.md §3). A failure rolls the whole batch
        back, and the round is redone on resume. Nested batches join the outer one.
        """
        if getattr(self._batch, "session", None) is not None:
            yield
            return
        with self._tx() as session:
            self._batch.session = session
            try:
                yield
            finally:
                self._batch.session = None


#: ``session.info`` key of the rows a transaction looked up (see :func:`_held`).
_HELD = "fedcl.held"


def _held(session: Session) -> dict[tuple[type, object], object]:
    """Rows this session looked up, kept referenced until the session ends.

    SQLAlchemy's identity map holds unmodified rows only weakly: a run or round fetched by one
    call of a batch was collected by the next, so every ``record_*`` of a round selected the same
    run, round and sites again (~5 ms a round). Holding them lets ``session.get`` answer from
    the identity map, as it does for any row a caller still references; nothing is cached past
    the session, so another process's changes are seen by the next transaction as before.
    """
    return session.info.setdefault(_HELD, {})


def get_run(session: Session, run_id: str) -> Run:
    held = _held(session).get((Run, run_id))
    if held is not None:  # looked up earlier in this transaction (a round's batch asks often)
        return held  # type: ignore[return-value]
    run = session.get(Run, run_id)
    if run is None:
        raise RegistryError(f"unknown run {run_id!r}")
    _held(session)[(Run, run_id)] = run
    return run


def get_round(session: Session, round_id: int, run_id: str | None = None) -> Round:
    """The round, checked to belong to ``run_id`` when one is given."""
    rnd = _held(session).get((Round, round_id)) or session.get(Round, round_id)
    if rnd is None:
        raise RegistryError(f"unknown round id {round_id}")
    if run_id is not None and rnd.run_id != run_id:
        raise RegistryError(
            f"round id {round_id} belongs to run {rnd.run_id!r}, not to run {run_id!r}"
        )
    _held(session)[(Round, round_id)] = rnd
    return rnd


def touch_sites(session: Session, site_ids: set[str]) -> None:
    """:func:`touch_site` for many sites in two statements (a round names up to hundreds).

    Sites this session already touched are left as they are (a round's batch names the same
    sites in its participations and in each metric write): their ``last_seen`` is this
    transaction's, and a second UPDATE of it a few milliseconds later said nothing new.
    """
    for site_id in site_ids:
        check_site_id(site_id)
    held = _held(session)
    fresh = {sid for sid in site_ids if (Site, sid) not in held}
    if not fresh:
        return
    now = utcnow()
    known = {s.id: s for s in session.scalars(select(Site).where(Site.id.in_(fresh)))}
    for site_id in sorted(fresh):
        site = known.get(site_id)
        if site is not None:
            site.last_seen = now
        else:
            site = Site(id=site_id, first_seen=now, last_seen=now)
            session.add(site)
        held[(Site, site_id)] = site
    session.flush()


def touch_site(session: Session, site_id: str) -> None:
    """Create the site on first contact and bump ``last_seen`` (the coordinator is the only
    writer, so select-then-insert cannot race)."""
    check_site_id(site_id)
    now = utcnow()
    site = session.get(Site, site_id)
    if site is None:
        session.add(Site(id=site_id, first_seen=now, last_seen=now))
        session.flush()
    else:
        site.last_seen = now
