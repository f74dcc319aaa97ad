"""The fedcl ClientApp: what a site does when the coordinator asks it to train or evaluate.

``app`` is the component string ``fedcl.client.app:app`` used by SuperNodes and by simulations
alike (DESIGN.md §2). A user mistake at the site (a bad site config, a corrupt image) is answered
with a *failed* status that names the problem, so the coordinator records it and the round goes
on with the other sites.
"""

from __future__ import annotations

import contextlib
import json
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.config import ExperimentConfig, FedclError, SiteConfig
from fedcl.config import protocol as P
from fedcl.datasets.info import dataset_info
from fedcl.models import build_model

from .site import SiteData, load_site_data, resolve_site_config
from .trainer import LocalTrainer, ProximalTerm, evaluate

logger = logging.getLogger("fedcl.client")

app = ClientApp()


class SiteJob:
    """One message's worth of context: the experiment, the site and its data."""

    def __init__(self, msg: Message, context: Context):
        cfg = msg.content[P.CONFIG]
        self.config = cfg
        self.experiment = ExperimentConfig.model_validate(json.loads(str(cfg[P.EXPERIMENT])))
        sites_dir = cfg.get(P.SITES_DIR)
        self.site: SiteConfig = resolve_site_config(
            dict(context.node_config), str(sites_dir) if sites_dir else None
        )
        self.site.state_dir.mkdir(parents=True, exist_ok=True)
        self.data: SiteData = load_site_data(self.experiment, self.site)
        self.task_index = int(cfg[P.TASK_INDEX])
        self.server_round = int(cfg[P.SERVER_ROUND])

    def global_model(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The coordinator's model, rebuilt from the experiment and loaded with its weights."""
        info = dataset_info(self.experiment.data, self.experiment.seed)
        model = build_model(
            self.experiment.model.name,
            in_channels=info.channels,
            image_size=info.image_size,
            num_classes=self.data.stream.num_outputs,
            **self.experiment.model.options,
        )
        model.load_state_dict(arrays.to_torch_state_dict())
        return model


def _site_record(site_id: str, status: str = P.STATUS_OK, detail: str = "") -> ConfigRecord:
    return ConfigRecord({P.SITE_ID: site_id, P.STATUS: status, P.DETAIL: detail})


def _failure(msg: Message, context: Context, err: Exception) -> Message:
    """Reply with a failed status instead of crashing: the coordinator records the reason."""
    site_id = str(context.node_config.get("site-id", f"node-{context.node_id}"))
    with contextlib.suppress(Exception):  # the site config itself may be what is broken
        site_id = resolve_site_config(
            dict(context.node_config), msg.content[P.CONFIG].get(P.SITES_DIR)
        ).site_id
    logger.error("site %s: %s", site_id, err)
    content = RecordDict({P.SITE: _site_record(site_id, P.STATUS_FAILED, str(err))})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's examples of the current task."""
    try:
        job = SiteJob(msg, context)
        model = job.global_model(msg.content[P.ARRAYS])
        hooks = []
        mu = float(job.config.get(P.PROXIMAL_MU, 0.0))
        if mu > 0:
            hooks.append(ProximalTerm(mu, [p for p in model.parameters() if p.requires_grad]))
        trainer = LocalTrainer(
            job.experiment.train,
            device=job.site.device,
            seed=job.experiment.seed * 100_003 + job.server_round,
        )
        result = trainer.fit(
            model,
            job.data.train_set(job.task_index),
            output_mask=job.data.stream.train_mask(job.task_index),
            hooks=hooks,
        )
    except FedclError as err:
        return _failure(msg, context, err)
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord(model.cpu().state_dict()),
            P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: result.num_examples, P.TRAIN_LOSS: result.loss}
            ),
            P.SITE: _site_record(job.site.site_id),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_tasks(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's test examples of every task."""
    try:
        job = SiteJob(msg, context)
        model = job.global_model(msg.content[P.ARRAYS])
        metrics: dict[str, float | int] = {}
        total = 0
        for j in range(len(job.data.stream.evaluation_tasks)):
            correct, count, loss = evaluate(
                model,
                job.data.test_set(j),
                output_mask=job.data.stream.eval_mask(j),
                device=job.site.device,
            )
            metrics[P.eval_key("correct", j)] = correct
            metrics[P.eval_key("count", j)] = count
            metrics[P.eval_key("loss", j)] = loss
            total += count
        metrics[P.NUM_EXAMPLES] = total
    except FedclError as err:
        return _failure(msg, context, err)
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: _site_record(job.site.site_id)})
    return Message(content, reply_to=msg)
