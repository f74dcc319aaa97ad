"""Reading TOML into the config models, with errors that name the file and the field."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: ``source: field 'a.b': message (got X)``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the documented keys)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{source}: field '{loc}': {msg}{shown}")
    return "\n".join(lines)


def validate_mapping(model: type[M], data: Mapping[str, Any], source: str) -> M:
    """Validate ``data`` against ``model``; any problem becomes a :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(source, err)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def load_toml(model: type[M], path: str | Path, overrides: Iterable[str] = ()) -> M:
    """Read ``path``, apply ``key=value`` overrides, validate."""
    data = read_toml(path)
    apply_overrides(data, overrides)
    return validate_mapping(model, data, str(path))


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, arrays), else take it as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict in place (``--set`` on the CLI)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.rounds_per_task=2")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a table")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return data


def to_json(model: BaseModel) -> str:
    """Canonical JSON (sorted keys) so equal configs compare equal as strings."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True)
