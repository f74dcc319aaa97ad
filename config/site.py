"""The site: what a site administrator controls (docs/DESIGN.md §8).

The coordinator decides *what* to learn; the site decides *which data*, *where its state lives*
and *how much privacy it will spend*. Nothing in this file is ever taken from the coordinator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SitePartition(_Strict):
    """This site's shard of a built-in dataset (virtual sites in simulations and demos)."""

    index: int = Field(ge=0)
    num_sites: int = Field(ge=1)
    scheme: Literal["iid", "dirichlet", "domain"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _index_in_range(self) -> SitePartition:
        if self.index >= self.num_sites:
            raise ValueError(f"index {self.index} must be smaller than num_sites {self.num_sites}")
        return self


class DataSource(_Strict):
    """``[data]`` of site.toml: where the site's examples come from (a built-in dataset shard, or
    a folder / manifest). The loaded examples are ``fedcl.client.site.SiteData``."""

    source: Literal["builtin", "folder"] = "builtin"
    name: str | None = None
    path: Path | None = None
    partition: SitePartition | None = None

    @model_validator(mode="after")
    def _source_fields(self) -> DataSource:
        if self.source == "folder" and self.path is None:
            raise ValueError("source = 'folder' needs path = '/data/site' (a folder or CSV)")
        return self


class PrivacyPolicy(_Strict):
    """``[privacy]`` of site.toml: the site's own privacy budget; the site refuses a round that
    would exceed it (enforced by ``fedcl.client.privacy_site.SitePrivacy``)."""

    epsilon_budget: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class SiteConfig(_Strict):
    """One site agent's configuration (``site.toml``)."""

    site_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    state_dir: Path
    device: str = "cpu"
    data: DataSource = Field(default_factory=DataSource)
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    key_path: Path | None = None
