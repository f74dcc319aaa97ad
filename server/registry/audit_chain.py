"""The audit log's hash chain: what each event's hash covers, how writers append, how to verify.

Each event stores ``prev_hash`` (the hash of the event before it, by id; :data:`GENESIS_HASH`
for the first) and ``hash`` = SHA-256 of the canonical JSON of its own fields plus ``prev_hash``.
Editing a row breaks its own hash; deleting one breaks the next row's link; cutting events off
the end is caught by the one-row chain head, which records the last event. The chain is not keyed:
someone with write access who recomputes every later hash and the head can rewrite history, which
is why :func:`verify_chain` reports the head hash for an operator to keep elsewhere and checks an
earlier head still lies on the chain (``anchor``).

The hashed document is fixed forever (changing it would break every existing log): the fields in
:data:`HASHED_FIELDS` plus ``prev_hash``, JSON with sorted keys, no whitespace, UTF-8, non-ASCII
kept as is, ``null`` for a missing run or site, ``created_at`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``
in UTC. The migration that introduced the chain (0003) hashes existing rows with these functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from .errors import RegistryError
from .models import AuditChainHead, AuditEvent

GENESIS_HASH = "0" * 64
HEAD_ID = 1
HASHED_FIELDS = ("id", "created_at", "run_id", "site_id", "kind", "message", "actor", "scope")
# Event scopes: who may read an event that names no site (one naming a site is also its site's).
SCOPE_FEDERATION = "federation"
SCOPE_COORDINATOR = "coordinator"
AUDIT_SCOPES = (SCOPE_FEDERATION, SCOPE_COORDINATOR)
_VERIFY_BATCH = 1000


def _instant(value: datetime) -> str:
    # SQLite hands back naive UTC (models.UTCDateTime stores it so); treat naive as UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_event(fields: Mapping[str, Any], prev_hash: str) -> bytes:
    """The exact bytes an event's hash covers (see the module docstring)."""
    doc: dict[str, Any] = {name: fields[name] for name in HASHED_FIELDS}
    doc["created_at"] = _instant(doc["created_at"])
    doc["prev_hash"] = prev_hash
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_hash(fields: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of :func:`canonical_event`."""
    return hashlib.sha256(canonical_event(fields, prev_hash)).hexdigest()


def _fields(event: AuditEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in HASHED_FIELDS}


def lock_head(session: Session) -> AuditChainHead:
    """Take the chain's write lock in ``session``'s transaction and return the current head.

    A no-op UPDATE of the head row: on PostgreSQL it row-locks the head until commit (a second
    writer waits, then reads the head the first one committed: READ COMMITTED takes a fresh
    snapshot per statement); on SQLite it takes the database's write lock before the head is
    read (pysqlite opens the transaction at the first write, so no stale read precedes it).
    Either way two writers can never chain onto the same event.
    """
    locked = session.execute(
        text("UPDATE audit_chain_head SET last_hash = last_hash WHERE id = :id"), {"id": HEAD_ID}
    )
    head = session.get(AuditChainHead, HEAD_ID, populate_existing=True)
    if locked.rowcount != 1 or head is None:  # type: ignore[attr-defined]
        raise RegistryError(
            "the audit log's chain head (table audit_chain_head, id 1) is missing: the log was "
            "tampered with; run `fedcl audit verify --db URL` and restore the registry from a "
            "backup"
        )
    return head


_PENDING = "fedcl_audit_pending"


def queue_event(session: Session, event: AuditEvent) -> None:
    """Chain ``event`` onto the log when ``session``'s transaction commits (and only then).

    Deferred to the commit so the head is the last lock a transaction takes and is held only
    for its final flush: a coordinator batch that audits early and writes versions later never
    holds the head while it waits on a row a dashboard promotion holds (a deadlock on
    PostgreSQL). The event's id is drawn under the lock, so id order is chain order.
    """
    session.info.setdefault(_PENDING, []).append(event)


def _next_ids(session: Session, count: int) -> list[int] | None:
    """``count`` fresh event ids, drawn under the head lock; ``None``: let inserts draw them.

    Known before the insert, they let the whole chain be hashed in Python and inserted in one
    statement: a flush per event (its id, then its hash) cost ~9 ms an event on a busy box.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":  # INTEGER PRIMARY KEY: SQLite itself would pick max + 1
        last = session.execute(text("SELECT coalesce(max(id), 0) FROM audit_events")).scalar()
        return list(range(int(last) + 1, int(last) + 1 + count))
    if dialect == "postgresql":  # from the column's own sequence, so later inserts never clash
        rows = session.execute(
            text(
                "SELECT nextval(pg_get_serial_sequence('audit_events', 'id')) "
                "FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
        return [int(r[0]) for r in rows]
    return None


def _chain_pending(session: Session) -> None:
    pending: list[AuditEvent] = session.info.pop(_PENDING, [])
    if not pending:
        return
    head = lock_head(session)
    ids = _next_ids(session, len(pending))
    prev = head.last_hash
    for i, event in enumerate(pending):
        event.prev_hash = prev
        if ids is None:
            event.hash = ""  # the id is part of the hash and only known after the insert
            session.add(event)
            session.flush()
        else:
            event.id = ids[i]
        event.hash = prev = event_hash(_fields(event), prev)
    session.add_all(pending)
    head.last_event_id = pending[-1].id
    head.last_hash = prev
    session.flush()


def _forget_pending(session: Session, _previous: Any = None) -> None:
    session.info.pop(_PENDING, None)


def chain_on_commit(sessions: sessionmaker[Session]) -> None:
    """Make every transaction of ``sessions`` chain its queued audit events as it commits."""
    sa_event.listen(sessions, "before_commit", _chain_pending)
    sa_event.listen(sessions, "after_soft_rollback", _forget_pending)


@dataclass(frozen=True)
class ChainBreak:
    """The first broken link: the event id (``None`` for the head) and what is wrong."""

    event_id: int | None
    reason: str


@dataclass(frozen=True)
class ChainReport:
    """What verification found: events checked, the head hash to keep, the first break."""

    events: int
    head_hash: str | None
    broken: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify_chain(session: Session, *, anchor: str | None = None) -> ChainReport:
    """Walk the log in id order and return the first broken link, if any.

    ``anchor``: a head hash recorded earlier; it must still be some event's hash, or history
    up to it was rewritten (edits with every later hash recomputed).
    """
    prev_id: int | None = None
    prev_hash = GENESIS_HASH
    count = 0
    anchor_seen = anchor is None or anchor == GENESIS_HASH

    def broken(event_id: int | None, reason: str) -> ChainReport:
        return ChainReport(count, None, ChainBreak(event_id, reason))

    query = select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=_VERIFY_BATCH)
    for event in session.scalars(query):
        count += 1
        label = f"audit event {event.id} ({event.kind!r}, {_instant(event.created_at)})"
        if event.hash != event_hash(_fields(event), event.prev_hash):
            return broken(
                event.id, f"{label}: its fields do not match its hash: the row was edited"
            )
        if event.prev_hash != prev_hash:
            if prev_id is None:
                where = "the genesis hash: events before it were deleted"
            elif event.id - prev_id > 1:
                where = (
                    f"the hash of event {prev_id}, the one before it: events {prev_id + 1}-"
                    f"{event.id - 1} between them were deleted"
                )
            else:
                where = (
                    f"the hash of event {prev_id}, the one before it: an event between them was "
                    f"deleted, or event {prev_id} was edited and its hash recomputed"
                )
            return broken(event.id, f"{label}: its prev_hash is not {where}")
        if event.hash == anchor:
            anchor_seen = True
        prev_id, prev_hash = event.id, event.hash
    head = session.get(AuditChainHead, HEAD_ID)
    if head is None:
        return broken(None, "the chain head (audit_chain_head id 1) was deleted")
    if head.last_event_id != prev_id or head.last_hash != prev_hash:
        last = "no event" if prev_id is None else f"event {prev_id}"
        return broken(
            head.last_event_id,
            f"the chain head records event {head.last_event_id} (hash {head.last_hash[:16]}…) "
            f"but the log ends at {last}: events at its end were deleted or the head was edited",
        )
    if not anchor_seen:
        return broken(
            None,
            f"the recorded head {anchor} is no event's hash: the log up to it was rewritten",
        )
    return ChainReport(count, prev_hash, None)
