"""Writing configs back to TOML (site files for virtual sites, templates for admins)."""

from __future__ import annotations

from pathlib import Path

import tomli_w
from pydantic import BaseModel


def write_toml(model: BaseModel, path: str | Path, *, mode: int = 0o644) -> Path:
    """Write ``model`` as TOML (None fields are left out: TOML has no null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.model_dump(mode="json", exclude_none=True)
    path.write_text(tomli_w.dumps(data))
    path.chmod(mode)
    return path
