"""The continual-method table: one row per ``continual.method``, the one seam methods plug into.

A :class:`ContinualMethod` declares everything the rest of fedcl needs to know about a method:

* ``site_hooks``: a factory that, given what a site knows for one training message
  (:class:`SiteContext`: the experiment, the round's training data, the site's private state
  folder, the model it received, the task and round indices) and the method's validated
  options, returns the ``TrainHook`` objects for ``LocalTrainer.fit``;
* ``consolidates``: whether every task but the last ends with a consolidation round (EWC:
  the sites compute a Fisher diagonal at the task's final global model);
* ``replays``: whether a site mixes its replay buffer into training (and so trains the full
  head in task-IL, since replayed examples belong to other tasks);
* ``release``: the DP release a consolidation makes besides DP-SGD training (EWC: one DP
  Fisher). :meth:`ContinualMethod.consolidation_release` is the one statement of it: the site
  plans σ with it, charges its ledger with it, and the mechanism runs with (and reports) it;
* ``options``: the model that validates ``continual.options`` (pydantic, ``extra="forbid"``);
* ``cell_disjoint``: whether task ``t``'s releases read only task ``t``'s records and public
  outputs (the global models, the federated Fisher, what DP-SGD released): then a site may
  account each task's data as its own cell (parallel composition, docs/DESIGN.md §9). False by
  default (fail closed): replay trains later tasks on earlier tasks' records, joint on all.

Adding a method is one module with its hooks and its options plus one row here (LwF: ``lwf.py``,
SI: ``si.py``). Rows refer to their module lazily, so importing the table (as the coordinator
and the CLI do) loads neither torch nor any method's code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from fedcl.config import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

    from fedcl.config import ExperimentConfig

    from .fisher import FisherRelease
    from .streams import Stream

__all__ = [
    "METHODS",
    "ContinualMethod",
    "NoOptions",
    "SiteContext",
    "available_methods",
    "get_method",
]


class NoOptions(BaseModel):
    """Settings of a method that has none of its own: ``continual.options`` must be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class SiteContext:
    """What a site knows when it builds a method's hooks for one training message."""

    experiment: ExperimentConfig
    stream: Stream
    #: This round's training set: the task's examples (plus the replay buffer if the method
    #: replays), exactly what ``LocalTrainer.fit`` trains on.
    data: Dataset
    #: This run's private state folder at the site (``<site state>/runs/<run id>``).
    state_dir: Path
    #: The global model as received, before local training changes it.
    model: nn.Module
    run_id: str
    site_id: str
    task_index: int
    round_in_task: int
    server_round: int
    #: The consolidated global state the coordinator sent, for methods that consolidate (the
    #: EWC memory); None otherwise.
    memory: Any = None


HookFactory = Callable[[SiteContext, BaseModel], Sequence[Any]]
ReleaseFactory = Callable[["ExperimentConfig", int], "FisherRelease"]


def _no_hooks(ctx: SiteContext, options: BaseModel) -> list[Any]:
    return []


@dataclass(frozen=True)
class ContinualMethod:
    """One row of the table (see the module docstring for what each field means)."""

    name: str
    summary: str
    site_hooks: HookFactory = _no_hooks
    consolidates: bool = False
    replays: bool = False
    release: ReleaseFactory | None = None
    #: Validates ``continual.options``: called with its keys as keyword arguments (a pydantic
    #: model class, or a lazy reference to one).
    options: Callable[..., BaseModel] = NoOptions
    #: Task t's releases read only task t's records and public outputs (see the module doc).
    cell_disjoint: bool = False

    def parse_options(self, options: Mapping[str, Any]) -> BaseModel:
        """``continual.options`` validated by this method; errors name the field."""
        if not isinstance(options, Mapping):
            raise ConfigError(f"field 'continual.options': must be a table, got {options!r}")
        try:
            return self.options(**dict(options))
        except ValidationError as err:
            raise ConfigError(_describe(self.name, err)) from None

    def check(self, experiment: ExperimentConfig) -> ContinualMethod:
        """Validate the experiment's ``continual.options`` for this method; returns the row."""
        self.parse_options(experiment.continual.options)
        return self

    def hooks(self, ctx: SiteContext) -> list[Any]:
        """The trainer hooks for one training message at a site (options validated first)."""
        options = self.parse_options(ctx.experiment.continual.options)
        return list(self.site_hooks(ctx, options))

    def consolidation_release(
        self, experiment: ExperimentConfig, num_examples: int
    ) -> FisherRelease | None:
        """The DP release one consolidation of ``num_examples`` makes; None if it makes none.

        The one statement of it: σ planning, the ledger charge and the mechanism's own report
        (``dp_fisher_diagonal``) all come from here, so they cannot disagree.
        """
        if not self.consolidates or self.release is None:
            return None
        return self.release(experiment, num_examples)


def _describe(method: str, err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in ("continual", "options", *item["loc"]))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            valid = _option_names(method)
            msg = f"unknown option of method {method!r}; valid: {', '.join(valid) or 'none'}"
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"field '{loc}': {msg}{shown}")
    return "\n".join(lines)


def _option_names(method: str) -> list[str]:
    model = METHODS[method].options
    model = getattr(model, "resolve", lambda: model)()
    return sorted(getattr(model, "model_fields", {}))


class _Lazy:
    """``fedcl.continual.<module>.<name>``, imported on first use (torch loads only then)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def resolve(self) -> Any:
        return getattr(import_module(f"{__package__}.{self.module}"), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name}>"


# --- EWC (ewc.py, fisher.py) ------------------------------------------------------------------


def _ewc_hooks(ctx: SiteContext, options: BaseModel) -> list[Any]:
    """The EWC penalty once a task has been consolidated (the memory comes from the server)."""
    memory = ctx.memory
    if memory is None or memory.is_empty:
        return []
    from .ewc import EWCHook

    train = ctx.experiment.train
    cap = 1.0 / train.lr if train.optimizer == "sgd" else None
    return [EWCHook(memory, ctx.experiment.continual.ewc_lambda, max_curvature=cap)]


def _fisher_release(experiment: ExperimentConfig, num_examples: int) -> FisherRelease:
    from .fisher import fisher_release

    spec = experiment.continual
    return fisher_release(
        clip_norm=spec.fisher_clip_norm,
        noise_multiplier=spec.fisher_noise_multiplier,
        num_examples=num_examples,
    )


# --- the table --------------------------------------------------------------------------------

METHODS: dict[str, ContinualMethod] = {
    m.name: m
    for m in (
        ContinualMethod(
            "naive", "fine-tune on each task in turn (the lower reference)", cell_disjoint=True
        ),
        ContinualMethod(
            "ewc",
            "online EWC: a federated DP Fisher per task, its penalty added after the noise",
            site_hooks=_ewc_hooks,
            consolidates=True,
            release=_fisher_release,
            # the DP Fisher of task t reads task t's data; the memory is the federated Fisher
            cell_disjoint=True,
        ),
        ContinualMethod(
            "replay", "site-local replay buffer of earlier tasks' examples", replays=True
        ),
        ContinualMethod(
            "ewc+replay",
            "online EWC and site-local replay together",
            site_hooks=_ewc_hooks,
            consolidates=True,
            replays=True,
            release=_fisher_release,
        ),
        ContinualMethod("joint", "all tasks at once (the upper reference, not continual)"),
        ContinualMethod(
            "lwf",
            "Learning without Forgetting: distil the previous task's global model per example",
            site_hooks=_Lazy("lwf", "site_hooks"),
            options=_Lazy("lwf", "LwFOptions"),
            cell_disjoint=True,  # the teacher is a global model: public
        ),
        ContinualMethod(
            "si",
            "Synaptic Intelligence: path-integral importance from the privatised gradients",
            site_hooks=_Lazy("si", "site_hooks"),
            options=_Lazy("si", "SIOptions"),
            # ω integrates the noised gradients DP-SGD wrote (trainer._step: after pre_step)
            # and the steps they caused: post-processing of task t's own release
            cell_disjoint=True,
        ),
    )
}


def available_methods() -> list[str]:
    """Valid ``continual.method`` names, sorted (for CLI choices and error messages)."""
    return sorted(METHODS)


def get_method(name: str) -> ContinualMethod:
    """The row for ``continual.method = name``; a :class:`ConfigError` naming the field else."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(
            f"field 'continual.method': {name!r} is not a continual method; valid: "
            f"{', '.join(available_methods())}"
        )
    return method
