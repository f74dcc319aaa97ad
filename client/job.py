"""One message's worth of site context: the experiment, the site, its data and the global state.

Global state (the model, and the EWC memory built from the summed Fisher of past tasks) arrives
with every message and is rebuilt here the same way at every site, so a site that was offline,
restarted or joined late is never behind: it only keeps its *private* state on disk (privacy
ledger, replay buffer).
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import torch
from flwr.app import Context, Message

from fedcl.config import ExperimentConfig, SiteConfig
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.dp.seeding import release_seed

from .codec import UpdateCodec, codec_for
from .device import resolve_device
from .retries import ReplyCache
from .site import SiteData, load_site_data, resolve_site_config


@lru_cache(maxsize=4)
def _experiment(text: str) -> ExperimentConfig:
    """Every message of a run carries the same experiment: validate it once per process (a
    frozen model, so the messages can share it)."""
    return ExperimentConfig.model_validate(json.loads(text))


@dataclass
class _Built:
    """One experiment's built model, and copies of it that answered a message and came back."""

    plan: RunPlan
    template: torch.nn.Module
    shape: tuple = ()  # the template's :func:`_shape`, what a spare must still have
    spares: list[torch.nn.Module] = field(default_factory=list)


_TEMPLATES: dict[int, _Built] = {}
_LOCK = threading.Lock()  # a Ray actor may run messages on several threads
#: Spares kept per experiment: one message at a time uses one; threads may hold a few.
MAX_SPARES = 4


def _built(plan: RunPlan) -> _Built:
    """One built model per experiment object (messages share it: :func:`_experiment`)."""
    key = id(plan.experiment)
    with _LOCK:
        found = _TEMPLATES.get(key)
        if found is None or found.plan.experiment is not plan.experiment:
            if len(_TEMPLATES) >= 4:
                _TEMPLATES.clear()
            model = plan.build_model()
            found = _TEMPLATES[key] = _Built(plan, model, _shape(model))
        return found


def _template(plan: RunPlan) -> torch.nn.Module:
    return _built(plan).template


def _shape(model: torch.nn.Module) -> tuple:
    """What a model must still have to be reused: its modules, their hooks, its tensors.

    A model that DP-SGD wrapped (Opacus' hooks, ``grad_sample``), that a method moved to a GPU,
    froze differently or left gradients on, differs here and is not reused.
    """
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    modules = tuple(
        (name, type(m), *(len(getattr(m, h, ())) for h in hooks))
        for name, m in model.named_modules()
    )
    params = tuple(
        (n, p.shape, p.dtype, p.device, p.requires_grad, p.grad is None, hasattr(p, "grad_sample"))
        for n, p in model.named_parameters()
    )
    buffers = tuple((n, b.shape, b.dtype, b.device) for n, b in model.named_buffers())
    return modules, params, buffers, tuple(sorted(vars(model)))


class SiteJob:
    """Parses a coordinator message against this site's own configuration."""

    def __init__(self, msg: Message, context: Context):
        self.msg = msg
        cfg = msg.content[P.CONFIG]
        self.config = cfg
        self.experiment = _experiment(str(cfg[P.EXPERIMENT]))
        sites_dir = cfg.get(P.SITES_DIR)
        self.site: SiteConfig = resolve_site_config(
            dict(context.node_config), str(sites_dir) if sites_dir else None
        )
        self.site.state_dir.mkdir(parents=True, exist_ok=True)
        threads = self.site.torch_threads
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # per message: a Ray actor plays many sites
        self.data: SiteData = load_site_data(self.experiment, self.site)
        # ``device`` resolved here once (auto / cuda without CUDA → cpu, said once per site), so
        # training, evaluation, the Fisher and drift all use the same concrete device.
        device = str(resolve_device(self.site.device, site_id=self.site.site_id))
        if device != self.site.device:
            self.site = self.site.model_copy(update={"device": device})
        self.run_id = str(cfg[P.RUN_ID])
        self.task_index = int(cfg[P.TASK_INDEX])
        self.server_round = int(cfg[P.SERVER_ROUND])
        self.round_in_task = int(cfg[P.ROUND_IN_TASK])

    def noise_seed(self, kind: str) -> int | None:
        """The seed of this message's ``kind`` of DP release, or None (the OS's; the default).

        Set only by the site's own ``privacy.research_seed`` (simulations and tests): a release is
        named by its round, the message it answers and its kind, so a round made again draws
        what it drew the first time.
        """
        names = (self.server_round, self.msg.metadata.message_type, kind)
        return release_seed(self.site.privacy.research_seed, *names)

    @property
    def state_dir(self):
        """This run's private state folder at the site."""
        folder = self.site.state_dir / "runs" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- decoding what the coordinator sent ----------------------------------------------------
    @cached_property
    def plan(self) -> RunPlan:
        """The run's schedule and model, as the coordinator computes them."""
        return RunPlan.of(self.experiment)

    @cached_property
    def replies(self) -> ReplyCache:
        """The replies this site produced in this run (an idempotent retry re-sends them)."""
        return ReplyCache(self.state_dir / "replies", durable=P.SITES_DIR not in self.config)

    @cached_property
    def codec(self) -> UpdateCodec:
        """Plaintext or CKKS, chosen once for this job (the only ``he.enabled`` branch)."""
        return codec_for(self.experiment, self.site)

    def new_model(self) -> torch.nn.Module:
        """A model of the run's architecture (its weights are overwritten or unused).

        Copied from one built per experiment: initialising a fresh model cost more than the
        copy on every message.
        """
        return copy.deepcopy(_template(self.plan))

    def global_model(self) -> torch.nn.Module:
        """The coordinator's current model, rebuilt from the experiment and its weights.

        Into a model an earlier message gave back (:meth:`reuse`) when there is one: the copy
        cost more than the round's evaluation on small models. Every parameter and buffer is
        overwritten (``load_state_dict`` is strict), so what it held before does not matter.
        """
        built = _built(self.plan)
        with _LOCK:
            model = built.spares.pop() if built.spares else None
        if model is None:
            model = self.new_model()
        model.load_state_dict(self.codec.decode(self.msg.content, P.ARRAYS, model.state_dict()))
        return model

    def reuse(self, model: torch.nn.Module) -> None:
        """Give back a :meth:`global_model` whose message is answered and which nothing holds.

        Only a model still shaped like the template (:func:`_shape`: no hooks added, no
        gradients left, nothing moved or frozen) is kept, in the template's train/eval mode,
        so the next message starts from what a fresh copy would be but for the weights it loads.
        """
        built = _built(self.plan)
        model.train(built.template.training)
        if type(model) is not type(built.template) or _shape(model) != built.shape:
            return
        with _LOCK:
            if len(built.spares) < MAX_SPARES and all(m is not model for m in built.spares):
                built.spares.append(model)

    def param_shapes(self) -> dict[str, torch.Tensor]:
        """Trainable parameters of the model (the names EWC and the Fisher use)."""
        return {n: p.detach() for n, p in self.new_model().named_parameters() if p.requires_grad}

    def fisher(self, task: int) -> dict[str, torch.Tensor]:
        """The federated Fisher of a consolidated task (clamped at 0: DP noise can go below)."""
        from fedcl.continual.fisher import fisher_from_sum

        summed, count = self.codec.decode_sum(
            self.msg.content, P.fisher_key(task), self.param_shapes()
        )
        return fisher_from_sum(summed, count)

    def ewc_memory(self):
        """EWC memory rebuilt from the summed Fisher of every consolidated task."""
        from fedcl.continual.ewc import EWCMemory

        memory = EWCMemory()
        tasks = int(self.config.get(P.FISHER_TASKS, 0))
        if tasks == 0:
            return memory
        model = self.new_model()
        anchor = self.codec.decode(self.msg.content, P.ANCHOR, model.state_dict())
        params = self.param_shapes()
        anchor = {n: t for n, t in anchor.items() if n in params}
        for k in range(tasks):
            memory.consolidate(
                self.fisher(k), anchor, self.experiment.continual.ewc_gamma, tag=f"task-{k}"
            )
        return memory
