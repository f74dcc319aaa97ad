"""Coordinator registry: the durable record of runs, rounds, sites, metrics and model versions.

SQLite (a file next to the artifacts) for a single coordinator, PostgreSQL for shared
deployments; the schema is owned by the Alembic migrations in ``migrations/`` and applied by
:meth:`Registry.open`.
"""

from .engine import default_sqlite_url
from .errors import RegistryError
from .info import (
    AuditInfo,
    DriftInfo,
    MetricInfo,
    MetricRow,
    ModelVersionInfo,
    ParticipationInfo,
    PrivacyInfo,
    RoundInfo,
    RunFingerprint,
    RunInfo,
    SessionInfo,
    SiteInfo,
    TaskStartInfo,
    TokenInfo,
)
from .store import Registry
from .validation import (
    PARTICIPATION_STATUSES,
    PHASES,
    ROUND_KINDS,
    ROUND_STATUSES,
    RUN_STATUSES,
    VERSION_STATUSES,
)

__all__ = [
    "PARTICIPATION_STATUSES",
    "PHASES",
    "ROUND_KINDS",
    "ROUND_STATUSES",
    "RUN_STATUSES",
    "VERSION_STATUSES",
    "AuditInfo",
    "DriftInfo",
    "MetricInfo",
    "MetricRow",
    "ModelVersionInfo",
    "ParticipationInfo",
    "PrivacyInfo",
    "Registry",
    "RegistryError",
    "RoundInfo",
    "RunFingerprint",
    "RunInfo",
    "SessionInfo",
    "SiteInfo",
    "TaskStartInfo",
    "TokenInfo",
    "default_sqlite_url",
]
