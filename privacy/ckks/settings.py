"""``[he]`` in the experiment TOML: CKKS-encrypted aggregation (proposed ``HESpec``).

The coordinator and every site read the same validated experiment, so the packing is agreed
by construction; the coordinator also checks each reply's packing against it. Key *files* are
not here: the coordinator's public context path is a coordinator setting, and each site's
secret context path belongs in its own ``site.toml`` (DESIGN.md §8).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .codec import Packing
from .errors import CKKSConfigError
from .params import CKKSParams


class HESettings(BaseModel):
    """CKKS-encrypted aggregation: sites send encrypted, weighted, quantised updates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    #: Coordinator only: the public context written by ``fedcl keys init`` (never secret.ctx).
    public_context: str | None = None
    #: SHA-256 of the key set (``fedcl keys show``). Pins the keys: the coordinator refuses another
    #: public.ctx and each site checks its secret.ctx against it before training.
    fingerprint: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    #: Quantisation bits per value; the step is clip / (2^(bits-1) - 1).
    bits: int = Field(15, ge=2, le=32)
    #: Values packed per CKKS slot: 2 gives 16 bytes per parameter (4x fp32) at 20 sites.
    values_per_slot: Literal[1, 2, 3] = 2
    #: Most sites summed in one round; sets the headroom bits, ceil(log2(max_sites)).
    max_sites: int = Field(20, ge=1)
    #: Update values (Δ per parameter) are clipped to [-clip, clip] before quantisation.
    clip: float = Field(0.5, gt=0)
    #: Weight unit: a site's weight is min(n, max_examples) / max_examples. Set it near the
    #: largest site's examples per round: larger costs small sites precision, smaller caps big
    #: sites' weight.
    max_examples: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _packing_is_exact(self) -> HESettings:
        if self.enabled:
            # Checked against the default key parameters; the real context is checked again
            # when the coordinator loads public.ctx and when a site encrypts.
            self.packing().scale_bits(CKKSParams())
        return self

    def packing(self) -> Packing:
        try:
            return Packing(
                bits=self.bits,
                values_per_slot=self.values_per_slot,
                max_sites=self.max_sites,
                clip=self.clip,
                max_examples=self.max_examples,
            )
        except CKKSConfigError as exc:  # pydantic turns ValueErrors into field errors
            raise ValueError(str(exc)) from None
