"""The fedcl ClientApp: what a site does when the coordinator asks it to train or evaluate.

``app`` is the component string ``fedcl.client.app:app`` used by SuperNodes and by simulations
alike (DESIGN.md §2). A user mistake at the site (a bad site config, a corrupt image) is answered
with a *failed* status that names the problem, so the coordinator records it and the round goes
on with the other sites.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.config import FedclError
from fedcl.config import protocol as P
from fedcl.models import state_sha256

from .continual_site import site_fisher, training_set
from .job import SiteJob
from .site import resolve_site_config
from .trainer import LocalTrainer, ProximalTerm, evaluate

logger = logging.getLogger("fedcl.client")

app = ClientApp()


def _site_record(
    site_id: str, status: str = P.STATUS_OK, detail: str = "", **extra
) -> ConfigRecord:
    return ConfigRecord({P.SITE_ID: site_id, P.STATUS: status, P.DETAIL: detail, **extra})


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


def _reply(msg: Message, job: SiteJob, records: dict, **site_fields) -> Message:
    records[P.SITE] = _site_record(job.site.site_id, **site_fields)
    return Message(RecordDict(records), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's examples of the current task."""
    try:
        job = SiteJob(msg, context)
        model = job.global_model()
        received = state_sha256(model.state_dict())
        hooks = []
        spec = job.experiment.continual
        memory = job.ewc_memory() if spec.uses_ewc else None
        if memory is not None and not memory.is_empty:
            from fedcl.continual.ewc import EWCHook

            train_spec = job.experiment.train
            cap = 1.0 / train_spec.lr if train_spec.optimizer == "sgd" else None
            hooks.append(EWCHook(memory, spec.ewc_lambda, max_curvature=cap))
        mu = float(job.config.get(P.PROXIMAL_MU, 0.0))
        if mu > 0:
            hooks.append(ProximalTerm(mu, [p for p in model.parameters() if p.requires_grad]))
        data = training_set(job)
        privacy = None
        if job.experiment.dp.enabled:
            from .privacy_site import SitePrivacy  # Opacus loads only when DP is on

            privacy = SitePrivacy(job)
            decision = privacy.charge(privacy.training_release(len(data)))
            if not decision.accepted:
                return _refused(msg, job, privacy, decision)
            hooks.insert(0, privacy.hook())  # first: the others add to the privatised gradient
        trainer = LocalTrainer(
            job.experiment.train,
            device=job.site.device,
            # Seeded by (task, round) rather than server round, so methods that add rounds
            # (EWC's consolidation) shuffle exactly like the naive baseline they are compared to.
            seed=job.experiment.seed * 100_003 + job.task_index * 1_000 + job.round_in_task,
        )
        try:
            # Replayed examples belong to earlier tasks: a task-IL mask of the current task
            # would make their loss infinite, so replay trains the full head (masks still apply
            # at evaluation, where the task identity is known).
            mask = None if spec.uses_replay else job.data.stream.train_mask(job.task_index)
            result = trainer.fit(model, data, output_mask=mask, hooks=hooks)
        finally:
            for hook in hooks:
                getattr(hook, "close", lambda: None)()
        _check_finite(model, job.site.site_id)
    except FedclError as err:
        return _failure(msg, context, err)
    metrics = {P.TRAIN_LOSS: result.loss}
    metrics.update({k: float(v) for k, v in result.metrics.items()})
    if privacy is not None:
        metrics.update(privacy.metrics())
    extra = {P.MODEL_SHA256: received}
    if memory is not None:
        extra[P.EWC_DIGEST] = memory.digest()
    try:
        records = _update_records(job, model.cpu().state_dict(), result.num_examples, received)
    except FedclError as err:
        return _failure(msg, context, err)
    records[P.METRICS] = MetricRecord({**metrics, **records.pop("stats")})
    return _reply(msg, job, records, **extra)


def _update_records(job: SiteJob, state: dict, num_examples: int, base: str, *, key=P.ARRAYS):
    """What leaves the site: plaintext weights and count, or one ciphertext holding both."""
    if not job.experiment.he.enabled:
        return {key: ArrayRecord(state), "stats": {P.NUM_EXAMPLES: num_examples}}
    from .encryption import meta_key

    fisher = key == P.FISHER
    arrays, meta, stats = job.crypto.encrypt(state, num_examples, base, fisher=fisher)
    return {key: arrays, meta_key(key) if key != P.ARRAYS else P.HE_META: meta, "stats": stats}


@app.train("consolidate")
def consolidate(msg: Message, context: Context) -> Message:
    """End of a task: this site's Fisher diagonal at the global model, weighted by its count."""
    from fedcl.continual.fisher import fisher_share

    try:
        job = SiteJob(msg, context)
        model = job.global_model()
        base = state_sha256(model.state_dict())
        privacy = None
        if job.experiment.dp.enabled:
            from fedcl.privacy.ledger import DPRelease

            from .privacy_site import SitePrivacy

            privacy = SitePrivacy(job)
            # The DP Fisher is a release like any other: paid before it is computed.
            spec = job.experiment.continual
            decision = privacy.charge(
                DPRelease("fisher", 1.0, spec.fisher_noise_multiplier, 1, privacy.delta)
            )
            if not decision.accepted:
                return _refused(msg, job, privacy, decision)
        fisher, n, _release = site_fisher(job, model)
        fisher = {name: fisher[name] for name in job.param_shapes()}  # the model's layout order
        if job.experiment.he.enabled:
            records = _update_records(job, fisher, n, base, key=P.FISHER)
        else:  # plaintext: the summed share F·n, its count riding along
            share = fisher_share(fisher, n)
            share[P.COUNT_ARRAY] = torch.tensor([float(n)])
            records = {P.FISHER: ArrayRecord(share), "stats": {P.NUM_EXAMPLES: n}}
    except FedclError as err:
        return _failure(msg, context, err)
    stats = records.pop("stats")
    if privacy is not None:
        stats.update(privacy.metrics())
    records[P.METRICS] = MetricRecord(stats)
    return _reply(msg, job, records, **{P.MODEL_SHA256: base})


@app.evaluate()
def evaluate_tasks(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's test examples of every task."""
    try:
        job = SiteJob(msg, context)
        model = job.global_model()
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
    return _reply(msg, job, {P.METRICS: MetricRecord(metrics)})


def _refused(msg: Message, job: SiteJob, privacy, decision) -> Message:
    """Refuse the round (a status, not a crash) and say how much has been spent."""
    reason = privacy.refusal(decision)
    logger.warning("site %s refuses round %d: %s", job.site.site_id, job.server_round, reason)
    return _reply(
        msg,
        job,
        {P.METRICS: MetricRecord(privacy.metrics())},
        status=P.STATUS_REFUSED,
        detail=reason,
    )


def _check_finite(model: torch.nn.Module, site_id: str) -> None:
    """A NaN/inf update is refused at the site, before it can poison the aggregate."""
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise FedclError(
                f"site {site_id}: local training produced non-finite values in {name!r} "
                "(learning rate too high?); the update was not sent"
            )
