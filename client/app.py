"""The fedcl ClientApp: what a site does when the coordinator asks it to train or evaluate.

``app`` is the component string ``fedcl.client.app:app`` used by SuperNodes and by simulations
alike (docs/DESIGN.md §2). A user mistake at a site (a bad site config, a corrupt image) is answered
with a *failed* status that names the problem, so the coordinator records it and the round goes
on with the other sites.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcl.config import FedclError
from fedcl.config import protocol as P
from fedcl.models import state_sha256
from fedcl.privacy.ckks.errors import AggregateIntegrityError
from fedcl.privacy.ledger import DPRelease

from . import private_eval
from .continual_site import site_fisher, training_set
from .device import place
from .job import SiteJob
from .privacy_site import admit, released_metrics  # (no Opacus: it loads when DP-SGD runs)
from .scoring import score_tasks
from .site import resolve_site_config
from .trainer import LocalTrainer, ProximalTerm

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
    extra = {P.AGGREGATE_CORRUPT: 1} if isinstance(err, AggregateIntegrityError) else {}
    content = RecordDict({P.SITE: _site_record(site_id, P.STATUS_FAILED, str(err), **extra)})
    return Message(content, reply_to=msg)


def _reply(msg: Message, job: SiteJob, records: dict, **site_fields) -> Message:
    # The round a reply answers travels with it, so a stale or replayed reply is recognised.
    site_fields.setdefault(P.SERVER_ROUND, job.server_round)
    records[P.SITE] = _site_record(job.site.site_id, **site_fields)
    return Message(RecordDict(records), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this site's examples of the current task."""
    try:
        job = SiteJob(msg, context)
        privacy, refusal = admit(job, "train")  # the site's own policy, before data is used
        if refusal is not None:
            return _refused(msg, job, privacy, refusal)
        start = time.perf_counter()
        model = job.global_model()
        decrypt_s = time.perf_counter() - start  # rebuilding the model; decrypting it under HE
        received = state_sha256(model.state_dict())
        cached = job.replies.lookup("train", job.server_round, received)
        if cached is not None:  # asked again: the same answer, no new noise, no new ε
            logger.info(
                "site %s: re-sending its reply to round %d", job.site.site_id, job.server_round
            )
            return Message(cached, reply_to=msg)
        scored = _score_received(job, model)  # before training changes the model
        from fedcl.continual.methods import get_method

        from .continual_site import site_context

        method = get_method(job.experiment.continual.method)  # the method's row declares it all
        memory = job.ewc_memory() if method.consolidates else None
        data = training_set(job)
        hooks = method.hooks(site_context(job, model, data, memory))
        mu = float(job.config.get(P.PROXIMAL_MU, 0.0))
        if mu > 0:
            hooks.append(ProximalTerm(mu, [p for p in model.parameters() if p.requires_grad]))
        # DP on: a plan for this N, the most ε per run, the budget. A task with no example
        # here touches no data and releases nothing: a zero-weight reply, as without DP.
        if privacy is not None and len(data) > 0:
            release = privacy.training_release(len(data))
            if not isinstance(release, DPRelease):  # no sampling plan fits this task here
                return _refused(msg, job, privacy, release, scored)
            decision = _charge_once(job, privacy, "train", release)
            if not decision.accepted:
                return _refused(msg, job, privacy, decision, scored)
            # First: the others add to the privatised gradient.
            hooks.insert(0, privacy.hook(max_physical_batch=job.site.max_physical_batch))
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
            mask = None if method.replays else job.data.stream.train_mask(job.task_index)
            result = trainer.fit(model, data, output_mask=mask, hooks=hooks)
        finally:
            for hook in hooks:
                getattr(hook, "close", lambda: None)()
        _check_finite(model, job.site.site_id)
    except FedclError as err:
        return _failure(msg, context, err)
    # Under DP the training loss (a mean over the site's examples, not noised) stays here.
    metrics = {} if privacy is not None else {P.TRAIN_LOSS: result.loss}
    metrics.update(released_metrics(job, result.metrics, dp=privacy is not None))
    if privacy is not None:
        metrics.update(privacy.metrics())
    if job.experiment.he.enabled:
        metrics[P.HE_DECRYPT_S] = decrypt_s
    extra = {P.MODEL_SHA256: received, **(scored.site_fields() if scored else {})}
    if memory is not None:
        extra[P.EWC_DIGEST] = memory.digest()
    try:  # what leaves the site: weights and count in clear, or one ciphertext holding both
        records, stats = job.codec.encode_update(
            place(model, "cpu").state_dict(), result.num_examples, received, job.server_round
        )
    except FedclError as err:
        return _failure(msg, context, err)
    records[P.METRICS] = MetricRecord({**metrics, **stats})
    if scored is not None:
        records[P.EVALUATION] = MetricRecord(scored.metrics)
    if privacy is None:  # the reply holds copies of the weights; DP-SGD's model is not reused
        job.reuse(model)
    return _kept(job, "train", received, _reply(msg, job, records, **extra))


@app.train("consolidate")
def consolidate(msg: Message, context: Context) -> Message:
    """End of a task: this site's Fisher diagonal at the global model, weighted by its count."""
    try:
        job = SiteJob(msg, context)
        privacy, refusal = admit(job, "consolidate")  # the site's policy, before data is used
        if refusal is not None:
            return _refused(msg, job, privacy, refusal)
        model = job.global_model()
        base = state_sha256(model.state_dict())
        cached = job.replies.lookup("consolidate", job.server_round, base)
        if cached is not None:  # asked again: the same Fisher, no new noise, no new ε
            return Message(cached, reply_to=msg)
        if privacy is not None:
            # The DP Fisher is a release like any other: paid before it is computed, as the
            # method states it (site_fisher refuses to send a Fisher computed otherwise).
            release = privacy.consolidation_release()
            decision = _charge_once(job, privacy, "consolidate", release)
            if not decision.accepted:
                return _refused(msg, job, privacy, decision)
        fisher, n, _release = site_fisher(job, model)
        fisher = {name: fisher[name] for name in job.param_shapes()}  # the model's layout order
        records, stats = job.codec.encode_share(P.FISHER, fisher, n, base, job.server_round)
    except FedclError as err:
        return _failure(msg, context, err)
    if privacy is not None:
        stats.update(privacy.metrics())
    records[P.METRICS] = MetricRecord(stats)
    return _kept(job, "consolidate", base, _reply(msg, job, records, **{P.MODEL_SHA256: base}))


def _kept(job: SiteJob, kind: str, base: str, reply: Message) -> Message:
    """Keep a reply at the site before it leaves, so a repeated question gets the same answer."""
    job.replies.store(kind, job.server_round, base, reply.content)
    return reply


def _charge_once(job: SiteJob, privacy, kind: str, release):
    """Charge ``release``, unless this round already paid for it and nothing of it left the site.

    A site that died between paying and replying released nothing (replies are kept before they
    leave: :func:`_kept`), so the retry reuses that charge instead of paying twice.
    """
    from fedcl.privacy.ledger import SpendDecision

    from .retries import paid_but_unsent

    unsent = not job.replies.has(kind, job.server_round) and paid_but_unsent(
        privacy.ledger,
        run_id=job.run_id,
        server_round=job.server_round,
        mechanism=release.mechanism,
        release=release,
    )
    if not unsent:
        return privacy.charge(release)
    logger.info("site %s: round %d was paid for and never sent", job.site.site_id, job.server_round)
    spent = privacy.ledger.epsilon(privacy.delta)
    return SpendDecision(True, spent, spent, privacy.budget)


@app.evaluate()
def evaluate_tasks(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this site's test examples of every task.

    Under DP what leaves is noised and charged first, or withheld (:mod:`.private_eval`).
    """
    try:
        job = SiteJob(msg, context)
        privacy, refusal = admit(job, "evaluate")  # the site's policy, before data is used
        if refusal is not None:
            return _refused(msg, job, privacy, refusal)
        model = job.global_model()
        mode = private_eval.mode_at(job)
        if mode == "withheld":  # nothing about the data leaves
            return _reply(msg, job, {P.METRICS: MetricRecord({})})
        base = state_sha256(model.state_dict())
        if mode == "noised":
            cached = job.replies.lookup("evaluate", job.server_round, base)
            if cached is not None:  # asked again: the same noised counts, no new ε
                return Message(cached, reply_to=msg)
        scored = _score(job, model, privacy, mode)
        job.reuse(model)  # scored in inference mode; nothing refers to it now
    except FedclError as err:
        return _failure(msg, context, err)
    if scored.refusal is not None:
        return _refused(msg, job, privacy, scored.refusal)
    reply = _reply(msg, job, {P.METRICS: MetricRecord(scored.metrics)})
    return reply if scored.charged is None else _kept(job, "evaluate", base, reply)


@dataclass(frozen=True)
class _Scored:
    """One evaluation of the global model at this site: what may leave, or why nothing does."""

    metrics: dict
    charged: DPRelease | None = None  # the noised release paid for it (None: clear/withheld)
    refusal: object | None = None  # the policy or ledger decision that refused it
    detail: str = ""

    def site_fields(self) -> dict[str, str]:
        """How the evaluation carried by a train reply went (the reply's status is training's)."""
        if self.refusal is None:
            return {}
        return {P.EVALUATION_STATUS: P.STATUS_REFUSED, P.EVALUATION_DETAIL: self.detail}


def _score(job: SiteJob, model: torch.nn.Module, privacy, mode: str) -> _Scored:
    """Evaluate ``model`` on every task; under noised DP the release is charged first."""
    if mode == "withheld":
        return _Scored({})
    charged = None
    if mode == "noised":
        charged = privacy.placed(private_eval.release(job, privacy.delta), "evaluate")
        decision = _charge_once(job, privacy, "evaluate", charged)  # before evaluating
        if not decision.accepted:
            return _Scored({}, refusal=decision, detail=privacy.refusal(decision))
    tasks = range(len(job.data.stream.evaluation_tasks))
    results = score_tasks(
        model,
        [job.data.test_set(j) for j in tasks],
        output_masks=[job.data.stream.eval_mask(j) for j in tasks],
        device=job.site.device,
    )
    seed = job.noise_seed("dp-evaluation") if charged is not None else None
    metrics = private_eval.released_metrics(mode, results, charged, seed=seed)
    if charged is not None:
        metrics.update(privacy.metrics())
    return _Scored(metrics, charged)


def _score_received(job: SiteJob, model: torch.nn.Module) -> _Scored | None:
    """The evaluation a train message asks for (``evaluate-round``), of the model it carries.

    The model is the previous round's output, so this is that round's evaluation, sent with
    this round's update: one round trip per round (``evaluation.mode = "with_train"``). The
    site's policy and ledger decide it as they decide an evaluate message.
    """
    if P.EVALUATE_ROUND not in job.config:
        return None
    privacy, refusal = admit(job, "evaluate")
    if refusal is not None:
        return _Scored({}, refusal=refusal, detail=privacy.refusal(refusal))
    mode = private_eval.mode_at(job, int(job.config[P.EVALUATE_ROUND]))
    return _score(job, model, privacy, mode)


def _refused(
    msg: Message, job: SiteJob, privacy, decision, scored: _Scored | None = None
) -> Message:
    """Refuse the round (a status, not a crash) and say how much has been spent.

    An evaluation this message already paid for and made (``scored``) still leaves with it.
    """
    reason = privacy.refusal(decision)
    logger.warning("site %s refuses round %d: %s", job.site.site_id, job.server_round, reason)
    records = {P.METRICS: MetricRecord(privacy.metrics())}
    if scored is not None:
        records[P.EVALUATION] = MetricRecord(scored.metrics)
    fields = scored.site_fields() if scored is not None else {}
    return _reply(msg, job, records, status=P.STATUS_REFUSED, detail=reason, **fields)


def _check_finite(model: torch.nn.Module, site_id: str) -> None:
    """A NaN/inf update is refused at the site, before it can poison the aggregate."""
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise FedclError(
                f"site {site_id}: local training produced non-finite values in {name!r} "
                "(learning rate too high?); the update was not sent"
            )


@app.query("verify")
def verify_group(msg: Message, context: Context) -> Message:
    """Does a group sum of the round's ciphertexts decrypt intact? Only that bit leaves the site.

    The coordinator asks this while it searches for the site whose update corrupted an
    aggregate (``fedcl.privacy.ckks.groups``); a group smaller than ``he.min_group_size`` is
    refused before anything is decrypted.
    """
    try:
        job = SiteJob(msg, context)
        passed = job.codec.verify_group(msg.content, like=job.new_model().state_dict())
    except FedclError as err:
        return _failure(msg, context, err)
    return _reply(msg, job, {P.METRICS: MetricRecord({P.VERIFIED: int(passed)})})


@app.query("drift")
def drift(msg: Message, context: Context) -> Message:
    """Has this site's data moved? Two scores and their alert bits (:mod:`.drift_site`).

    Under DP the report is charged to the site's ledger before it is computed, and a repeated
    question gets the kept answer (no new noise, no new ε).
    """
    from . import drift_site
    from .privacy_site import SitePrivacy

    try:
        job = SiteJob(msg, context)
        refusal = drift_site.refusal(job)  # the site's policy, before data is used
        privacy = SitePrivacy(job) if job.experiment.dp.enabled or refusal else None
        if refusal is not None:
            return _refused(msg, job, privacy, refusal)
        model = job.global_model()
        base = state_sha256(model.state_dict())
        cached = job.replies.lookup("drift", job.server_round, base)
        if cached is not None:
            return Message(cached, reply_to=msg)
        drift_site.plan_window(job)  # sizes only: a site too small says so before paying
        metrics: dict[str, float] = {}
        if privacy is not None:
            release = privacy.placed(DPRelease.of(drift_site.release(job), privacy.delta), "drift")
            decision = _charge_once(job, privacy, "drift", release)
            if not decision.accepted:
                return _refused(msg, job, privacy, decision)
        metrics.update(drift_site.report(job, model).released())
    except FedclError as err:
        return _failure(msg, context, err)
    if privacy is not None:
        metrics.update(privacy.metrics())
    reply = _reply(msg, job, {P.METRICS: MetricRecord(metrics)}, **{P.MODEL_SHA256: base})
    return _kept(job, "drift", base, reply)
