"""The registry facade the coordinator, CLI and dashboard use.

``Registry`` is assembled from one class per aggregate (runs, rounds, participations, metrics,
model versions, privacy spend, audit log, tokens, sessions), each in its own module, so a change
to how model versions roll out cannot touch how rounds restart. Callers see one object: every public
method is one short transaction on a shared ``sessionmaker`` (see ``core.py``) and returns frozen
snapshots (``info.py``), never ORM objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import Engine

from .audit import AuditLog
from .audit_chain import chain_on_commit
from .drift import DriftRecords
from .engine import open_database
from .metrics import Metrics
from .participations import Participations
from .privacy_spend import PrivacyRecords
from .rounds import Rounds
from .runs import Runs
from .sessions import Sessions
from .tokens import Tokens
from .versions import ModelVersions


class Registry(
    Runs,
    Rounds,
    Participations,
    Metrics,
    ModelVersions,
    PrivacyRecords,
    DriftRecords,
    AuditLog,
    Tokens,
    Sessions,
):
    """Coordinator registry: runs, rounds, sites, metrics, model versions, privacy, audit, tokens.

    Open with :meth:`open` (which migrates the schema) and close when done, or use it as a
    context manager. ``url`` is the password-masked URL, safe to log and show in the dashboard.
    """

    def __init__(self, engine: Engine, *, url: str, artifacts_dir: Path) -> None:
        """Use :meth:`open`; this wires an already-migrated engine (and the audit chain)."""
        super().__init__(engine, url=url, artifacts_dir=artifacts_dir)
        chain_on_commit(self._sessions)

    @classmethod
    def open(cls, url: str, *, artifacts_dir: str | os.PathLike[str] | None = None) -> Registry:
        """Connect to ``url``, upgrade the schema to head and return the registry.

        Artifacts default to ``<db folder>/artifacts`` for SQLite files (so a registry is one
        self-contained folder) and ``./fedcl-artifacts`` otherwise.
        """
        db = open_database(url)
        if artifacts_dir is not None:
            artifacts = Path(artifacts_dir).expanduser().resolve()
        else:
            artifacts = db.default_artifacts_dir
        return cls(db.engine, url=db.shown_url, artifacts_dir=artifacts)

    def close(self) -> None:
        """Release all database connections; further calls raise :class:`RegistryError`."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r}, artifacts_dir={str(self.artifacts_dir)!r})"
