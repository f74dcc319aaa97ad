"""A run's model versions: how a round's output is stored, and which one a round starts from.

Every round stores its output in the registry as a model version of kind ``model`` (or, for a
consolidation round, the summed Fisher: kind ``fisher``, format ``fisher-*``; never promoted).
The version policy lives here, beside the coordinator and not in the web package: a restarted
coordinator resumes from the model the next round *would* have started from — the newest version,
unless the canary rolled it back, in which case production — and rebuilds the EWC memory from the
stored Fishers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import ArrayRecord
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedcl.config.vocabulary import VersionKind, VersionState
from fedcl.strategies import GlobalModel

from .registry import ModelVersionInfo, Registry

logger = logging.getLogger("fedcl.server")

FISHER_FORMAT = "fisher"  # model-version format prefix of a consolidated task's summed Fisher


def encode_model(model: GlobalModel) -> tuple[bytes, bool, str]:
    """(payload, encrypted, format): CKKS blocks with their metadata, or safetensors (no pickle)."""
    if model.meta is not None:
        from fedcl.privacy.ckks.wire import aggregate_to_bytes

        return aggregate_to_bytes(model.arrays, model.meta), True, "ckks"
    state = model.state()
    return save_safetensors({k: v.contiguous() for k, v in state.items()}), False, "safetensors"


def decode_model(payload: bytes) -> GlobalModel:
    from fedcl.privacy.ckks.wire import MAGIC, aggregate_from_bytes

    if payload.startswith(MAGIC):
        return GlobalModel(*aggregate_from_bytes(payload))
    return GlobalModel(ArrayRecord(load_safetensors(payload)))


def is_fisher(version: ModelVersionInfo) -> bool:
    return version.kind == VersionKind.FISHER


def is_model(version: ModelVersionInfo) -> bool:
    """A global model the rounds train (not a Fisher, not a site's plaintext release)."""
    return version.kind == VersionKind.MODEL


@dataclass
class ContinualMemory:
    """EWC's global inputs: the summed Fisher of every consolidated task and its anchor θ*."""

    fisher: list[GlobalModel] = field(default_factory=list)
    anchor: GlobalModel | None = None


@dataclass(frozen=True)
class ResumePoint:
    model: GlobalModel
    done_rounds: int
    memory: ContinualMemory


class VersionStore:
    """Stores and loads one run's versions in the registry."""

    def __init__(self, registry: Registry, run_id: str) -> None:
        self.registry = registry
        self.run_id = run_id

    def save(
        self,
        round_id: int,
        *,
        task_index: int,
        server_round: int,
        model: GlobalModel,
        fisher: bool = False,
    ) -> None:
        payload, encrypted, fmt = encode_model(model)
        self.registry.save_model_version(
            self.run_id,
            round_id,
            task_index=task_index,
            server_round=server_round,
            payload=payload,
            encrypted=encrypted,
            format=f"{FISHER_FORMAT}-{fmt}" if fisher else fmt,
            kind=VersionKind.FISHER if fisher else VersionKind.MODEL,
        )

    def load(self, version: ModelVersionInfo) -> GlobalModel:
        return decode_model(self.registry.load_artifact(version))

    def after_canary(
        self, candidate: GlobalModel, max_drop: float | None, sites: Sequence[str] = ()
    ) -> GlobalModel:
        """The production rule and the canary (:mod:`.canary`): the model the next round starts
        from.

        A run's first evaluated model version becomes production. With ``max_drop`` set, a
        newer candidate that holds on the canary ``sites`` is promoted, and one that evaluated
        more than ``max_drop`` below production is rolled back: the run goes on from production.
        """
        from .canary import canary_step

        decision = canary_step(self.registry, self.run_id, max_drop=max_drop, sites=sites)
        if decision.action != "rolled_back":
            if decision.action == "promoted":
                logger.info("canary: %s", decision.message)
            return candidate
        logger.warning("canary: %s; the next round starts from production", decision.message)
        return self.production() or candidate

    def production(self) -> GlobalModel | None:
        """The model promoted to production (what a canary rollback returns to)."""
        version = self._production(self.registry.list_model_versions(self.run_id))
        return self.load(version) if version is not None else None

    @staticmethod
    def _production(versions: list[ModelVersionInfo]) -> ModelVersionInfo | None:
        production = [v for v in versions if v.status == VersionState.PRODUCTION and is_model(v)]
        return production[-1] if production else None

    def resume(self, initial: GlobalModel) -> ResumePoint:
        """Where a (re)started coordinator picks up: after the last completed round."""
        last = self.registry.last_completed_round(self.run_id)
        if last is None:
            return ResumePoint(initial, 0, ContinualMemory())
        versions = sorted(
            self.registry.list_model_versions(self.run_id), key=lambda v: v.server_round
        )
        memory = ContinualMemory()
        for v in versions:
            if is_fisher(v):
                # The Fisher was computed at the model its consolidation round started from: θ*.
                memory.fisher.append(self.load(v))
                memory.anchor = self._start_of(versions, v.server_round)
        logger.info("run %s: resuming after round %d", self.run_id, last.server_round)
        model = self._start_of(versions, last.server_round + 1)
        return ResumePoint(model, last.server_round, memory)

    def _start_of(self, versions: list[ModelVersionInfo], server_round: int) -> GlobalModel:
        """The model round ``server_round`` started from: the newest model version before it,
        or production when the canary rolled that version back."""
        models = [v for v in versions if is_model(v) and v.server_round < server_round]
        latest = models[-1]
        if latest.status == VersionState.ROLLED_BACK:
            production = self._production(models)
            if production is not None:
                return self.load(production)
        return self.load(latest)
