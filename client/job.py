"""One message's worth of site context: the experiment, the site, its data and the global state.

Global state (the model, and the EWC memory built from the summed Fisher of past tasks) arrives
with every message and is rebuilt here the same way at every site, so a site that was offline,
restarted or joined late is never behind: it only keeps its *private* state on disk (privacy
ledger, replay buffer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property

import torch
from flwr.app import ArrayRecord, Context, Message

from fedcl.config import ExperimentConfig, SiteConfig
from fedcl.config import protocol as P
from fedcl.datasets.info import dataset_info
from fedcl.models import build_model

from .site import SiteData, load_site_data, resolve_site_config


def split_count(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Separate the example-count array from a summed record (Fisher shares carry one)."""
    tensors = {k: v for k, v in state.items() if k != P.COUNT_ARRAY}
    count = int(round(float(state[P.COUNT_ARRAY].reshape(-1)[0]))) if P.COUNT_ARRAY in state else 0
    return tensors, count


class SiteJob:
    """Parses a coordinator message against this site's own configuration."""

    def __init__(self, msg: Message, context: Context):
        self.msg = msg
        cfg = msg.content[P.CONFIG]
        self.config = cfg
        self.experiment = ExperimentConfig.model_validate(json.loads(str(cfg[P.EXPERIMENT])))
        sites_dir = cfg.get(P.SITES_DIR)
        self.site: SiteConfig = resolve_site_config(
            dict(context.node_config), str(sites_dir) if sites_dir else None
        )
        self.site.state_dir.mkdir(parents=True, exist_ok=True)
        self.data: SiteData = load_site_data(self.experiment, self.site)
        self.run_id = str(cfg[P.RUN_ID])
        self.task_index = int(cfg[P.TASK_INDEX])
        self.server_round = int(cfg[P.SERVER_ROUND])
        self.round_in_task = int(cfg[P.ROUND_IN_TASK])

    @property
    def state_dir(self):
        """This run's private state folder at the site."""
        folder = self.site.state_dir / "runs" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- decoding what the coordinator sent ----------------------------------------------------
    @cached_property
    def crypto(self):
        """This site's CKKS keys (only when the experiment encrypts)."""
        from .encryption import SiteCrypto

        return SiteCrypto(self.experiment, self.site)

    def is_encrypted(self, key: str) -> bool:
        from .encryption import meta_key

        return meta_key(key) in self.msg.content.config_records

    def decode_state(
        self, key: str, like: dict[str, torch.Tensor] | None = None, *, fisher: bool = False
    ) -> dict[str, torch.Tensor]:
        """A state dict the coordinator sent under ``key``: plaintext, or decrypted here.

        An encrypted record decrypts to the example-weighted *mean* over the sites that
        contributed (the count never leaves the ciphertext); ``like`` gives names and shapes.
        """
        record: ArrayRecord = self.msg.content[key]
        if not self.is_encrypted(key):
            return record.to_torch_state_dict()
        from .encryption import meta_key

        assert like is not None, "decrypting needs the expected names and shapes"
        meta = self.msg.content.config_records[meta_key(key)]
        return self.crypto.decrypt(record, meta, like, fisher=fisher)

    def new_model(self) -> torch.nn.Module:
        info = dataset_info(self.experiment.data, self.experiment.seed)
        return build_model(
            self.experiment.model.name,
            in_channels=info.channels,
            image_size=info.image_size,
            num_classes=self.data.stream.num_outputs,
            **self.experiment.model.options,
        )

    def global_model(self) -> torch.nn.Module:
        """The coordinator's current model, rebuilt from the experiment and its weights."""
        model = self.new_model()
        model.load_state_dict(self.decode_state(P.ARRAYS, like=model.state_dict()))
        return model

    def param_shapes(self) -> dict[str, torch.Tensor]:
        """Trainable parameters of the model (the names EWC and the Fisher use)."""
        return {n: p.detach() for n, p in self.new_model().named_parameters() if p.requires_grad}

    def fisher(self, task: int) -> dict[str, torch.Tensor]:
        """The federated Fisher of a consolidated task (clamped at 0: DP noise can go below)."""
        from fedcl.continual.fisher import fisher_from_sum

        key = P.fisher_key(task)
        if self.is_encrypted(key):
            mean = self.decode_state(key, like=self.param_shapes(), fisher=True)
            return fisher_from_sum(mean, 1)
        summed, count = split_count(self.decode_state(key))
        return fisher_from_sum(summed, count)

    def ewc_memory(self):
        """EWC memory rebuilt from the summed Fisher of every consolidated task."""
        from fedcl.continual.ewc import EWCMemory

        memory = EWCMemory()
        tasks = int(self.config.get(P.FISHER_TASKS, 0))
        if tasks == 0:
            return memory
        model = self.new_model()
        anchor = self.decode_state(P.ANCHOR, like=model.state_dict())
        params = self.param_shapes()
        anchor = {n: t for n, t in anchor.items() if n in params}
        for k in range(tasks):
            memory.consolidate(
                self.fisher(k), anchor, self.experiment.continual.ewc_gamma, tag=f"task-{k}"
            )
        return memory
