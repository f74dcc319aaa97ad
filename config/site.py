"""The site: what a site administrator controls (docs/DESIGN.md §8).

The coordinator decides *what* to learn; the site decides *which data*, *where its state lives*
and *how much privacy it will spend*. Nothing in this file is ever taken from the coordinator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SitePartition(_Strict):
    """This site's shard of a built-in dataset (virtual sites in simulations and demos)."""

    index: int = Field(ge=0)
    num_sites: int = Field(ge=1)
    scheme: Literal["iid", "dirichlet", "domain"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    seed: int = 0
    min_per_site: int = Field(10, ge=1)

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
    """``[privacy]`` of site.toml: the site's own privacy policy, which no experiment overrides.

    The coordinator proposes DP settings; the site refuses (status *refused*, naming the rule)
    a train or consolidation round they fall short of, before it touches its data, and pays
    nothing for it (``fedcl.client.privacy_site``; docs/DESIGN.md §9):

    * ``epsilon_budget``: the lifetime ε this site will ever spend, over all runs.
    * ``delta``: the δ at which the site accounts ε.
    * ``require_dp``: never train (nor evaluate) without DP-SGD. Default: true whenever the site
      sets a budget, a least σ or a most ε per run (each means "not without DP"); false when it
      sets none of them. An explicit value wins.
    * ``min_noise_multiplier``: the least σ the site accepts, for DP-SGD and for every other
      Gaussian release it makes (the EWC DP Fisher).
    * ``max_epsilon_per_run``: the most ε one run may spend at this site.
    * ``allow_parallel_composition``: whether this site may account a run by parallel
      composition over its disjoint data cells (``dp.composition = "parallel"``); false: every
      release composes sequentially, whatever the experiment says.
    * ``research_seed``: **simulations and tests only.** Seeds every secret draw this site makes
      from this number: its DP noise and sampling (per release: round, message and kind;
      :mod:`fedcl.privacy.dp.seeding`) and its replay/drift key, so a run reruns
      bit-identically. Anyone who learns it can remove the noise and tell which examples a
      buffer keeps; unset (the default), every draw comes from the OS.
    """

    epsilon_budget: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    require_dp: bool = False  # filled in from the other fields unless given (``_dp_default``)
    min_noise_multiplier: float | None = Field(None, gt=0)
    max_epsilon_per_run: float | None = Field(None, gt=0)
    allow_parallel_composition: bool = True
    research_seed: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _dp_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("require_dp") is None:
            data = {**data, "require_dp": _limits_dp(data)}
        return data

    @model_serializer(mode="wrap")
    def _omit_derived(self, handler: Any) -> Any:
        """Leave ``require_dp`` out when it is the default, so that a site.toml written from
        this policy and then given a budget by hand still defaults to requiring DP."""
        data = handler(self)
        if isinstance(data, dict) and self.require_dp == _limits_dp(data):
            data.pop("require_dp", None)
        if isinstance(data, dict) and self.allow_parallel_composition:
            data.pop("allow_parallel_composition", None)  # the default: site.toml as before
        return data


def _limits_dp(fields: dict) -> bool:
    return any(
        fields.get(name) is not None
        for name in ("epsilon_budget", "min_noise_multiplier", "max_epsilon_per_run")
    )


class SiteConfig(_Strict):
    """One site agent's configuration (``site.toml``)."""

    site_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    state_dir: Path
    device: str = "cpu"
    #: torch's intra-op threads while this site trains (``torch.set_num_threads``); None leaves
    #: torch's default (one per core). A simulation sets it to the CPUs a virtual site is given
    #: (``simulation.num_cpus``): more threads than cores, on a shared box, ran 20-40x slower.
    torch_threads: int | None = Field(None, ge=1)
    #: The most examples one DP-SGD forward/backward pass holds: this machine's memory, not a
    #: hyper-parameter. A larger Poisson draw goes through in passes that add up to one noisy
    #: step (Opacus' BatchMemoryManager): same mechanism, same ε. None: a draw in one pass.
    max_physical_batch: int | None = Field(None, ge=1)
    data: DataSource = Field(default_factory=DataSource)
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    key_path: Path | None = None
