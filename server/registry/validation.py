"""Checks on what callers hand the registry, done before anything touches the database.

Enum-like columns are plain strings in the schema (``models.py`` says why), so this is where a
misspelt status is refused; the allowed words come from :mod:`fedcl.config.vocabulary`, the one
owner of that vocabulary. Ids that become path components are held to a safe alphabet here too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fedcl.config.vocabulary import (
    Phase,
    RoundKind,
    RoundStatus,
    RunStatus,
    SiteStatus,
    VersionKind,
    VersionState,
    values,
)

from .errors import RegistryError

RUN_STATUSES = values(RunStatus)
ROUND_KINDS = values(RoundKind)
ROUND_STATUSES = values(RoundStatus)
PHASES = values(Phase)
PARTICIPATION_STATUSES = values(SiteStatus)
VERSION_STATUSES = values(VersionState)
VERSION_KINDS = values(VersionKind)

# Run ids and formats become path components of artifacts; keep them to a safe alphabet so a run
# id can never escape the artifacts folder ("../x") or clash with hidden temp files (".x").
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def check_value(what: str, value: str, valid: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``valid``, listing the valid ones."""
    if value not in valid:
        raise RegistryError(f"invalid {what} {value!r}; valid values: {', '.join(valid)}")


def check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise RegistryError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the run's artifacts folder)"
        )


def check_site_id(site_id: str) -> None:
    if not isinstance(site_id, str) or not site_id or len(site_id) > 128:
        raise RegistryError(f"invalid site id {site_id!r}: expected 1-128 characters")


def check_format(format: str) -> None:
    """A model format names the artifact's file extension."""
    if not _FORMAT.fullmatch(format):
        raise RegistryError(f"invalid model format {format!r}: use letters, digits, '_', '-'")


def json_normalised(config: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The config as it will read back from the JSON column (tuples become lists, etc.).

    Comparing normalised forms is what makes "resume with the same config" succeed even when the
    caller built the config with tuples or int keys.
    """
    try:
        normalised = json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"config of run {run_id!r} is not JSON-serialisable: {exc}") from None
    if not isinstance(normalised, dict):
        raise RegistryError(f"config of run {run_id!r} must be a mapping, got {type(config)}")
    return normalised


def differing_keys(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ (or exist on one side only), sorted."""
    missing = object()
    keys = set(stored) | set(given)
    return sorted(k for k in keys if stored.get(k, missing) != given.get(k, missing))
