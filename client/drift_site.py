"""The site's half of drift monitoring: its window, its reference, and the model's view of both.

After every training round (and in the monitoring rounds between tasks) the coordinator asks
each site, with a ``query.drift`` message carrying the global model, how far its data has moved
(docs/DESIGN.md §12). The site

1. takes its **reference**, a sample of its data of the task the federation is training, and
   its **window**, a sample of the data it now sees — the same task's data, unless a simulated
   drift event (``[[simulation.drift]]``) says its incoming data is already a later task's —
   both in a keyed order under its own key and the round (keyed bottom-k, as the replay buffer:
   one example added or removed changes each by at most one slot);
2. runs the global model on both: the input of its last linear layer (the embedding), fixed
   random projection to ``drift.dim`` dimensions, and its predicted classes;
3. assesses the window (:func:`fedcl.continual.drift.assess`) and sends only the two scores and
   their alert bits (:data:`fedcl.continual.drift.RELEASED_KEYS`); under DP the ClientApp has
   charged :func:`release` to the ledger before any of this runs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcl.config import FedclError
from fedcl.continual.drift import (
    DriftRelease,
    assess,
    drift_release,
    project,
    settings_of,
)
from fedcl.continual.drift.calibration import keyed_order
from fedcl.continual.replay_keys import load_or_create_key

from .job import SiteJob

logger = logging.getLogger("fedcl.client")

#: Fewest examples a window may have (a smaller one says nothing).
MIN_WINDOW = 10


@dataclass(frozen=True)
class WindowPlan:
    """Which task's data the window and the reference come from, and their sizes."""

    reference_task: int
    window_task: int
    window: int
    reference: int


def seen_task(job: SiteJob) -> int:
    """The task whose data this site sees now: the current one, or a simulated drift's."""
    task = job.task_index
    for event in job.experiment.simulation.drift:
        if f"site-{event.site}" == job.site.site_id and event.round <= job.server_round:
            task = max(task, min(event.task, job.data.stream.num_tasks - 1))
    return task


def plan_window(job: SiteJob) -> WindowPlan:
    """Sizes from the pools' sizes alone (no example is looked at): known before any charge.

    Without DP the sizes shrink to what the site holds (a window of at most a quarter of a
    shared pool); under DP they must be the experiment's (the sensitivity is stated for them).
    """
    spec = job.experiment.drift
    ref_task, win_task = job.task_index, seen_task(job)
    n_ref_pool = len(job.data.train_set(ref_task))
    n_win_pool = len(job.data.train_set(win_task)) if win_task != ref_task else n_ref_pool
    if win_task == ref_task:
        n = min(spec.window, n_ref_pool // 4)
        big = min(spec.reference, n_ref_pool - n)
    else:
        n = min(spec.window, n_win_pool)
        big = min(spec.reference, n_ref_pool)
    n = min(n, big // 2)
    if job.experiment.dp.enabled and (n, big) != (spec.window, spec.reference):
        if win_task == ref_task:  # both from one pool: the window at most a quarter of it
            task, have = ref_task, n_ref_pool
            need = max(spec.window + spec.reference, 4 * spec.window)
        elif n_ref_pool < spec.reference:
            task, have, need = ref_task, n_ref_pool, spec.reference
        else:
            task, have, need = win_task, n_win_pool, spec.window
        raise FedclError(
            f"site {job.site.site_id}: drift under DP needs a window of drift.window = "
            f"{spec.window} and a reference of drift.reference = {spec.reference} examples; "
            f"task {task} has {have} here (at least {need} needed): lower them"
        )
    if n < MIN_WINDOW:
        raise FedclError(
            f"site {job.site.site_id}: too few examples of task {ref_task} for a drift window "
            f"({n_ref_pool}; a window needs at least {MIN_WINDOW} and a reference twice that)"
        )
    return WindowPlan(ref_task, win_task, n, big)


def release(job: SiteJob) -> DriftRelease:
    """What this site's drift report spends under DP (charge it before :func:`report`)."""
    return drift_release(settings_of(job.experiment))


def site_key(job: SiteJob) -> bytes:
    """This round's key: the site's secret key (``replay.key``), the run and the round.

    With a research seed the run is left out: two runs of one experiment then draw the same
    windows, as they draw the same noise (``fedcl.privacy.dp.seeding``); with the run in it,
    every ``fedcl simulate`` (a new run id each) monitored other windows.
    """
    research_seed = job.site.privacy.research_seed
    secret = load_or_create_key(job.site.state_dir, research_seed=research_seed)
    run = "research-seed" if research_seed is not None else job.run_id
    label = f"fedcl-drift/{run}/{job.server_round}".encode()
    return hmac.new(secret, label, hashlib.sha256).digest()


def _inputs(job: SiteJob, task: int) -> torch.Tensor:
    return job.data.train_set(task).tensors[0]


def _samples(job: SiteJob, plan: WindowPlan, key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference inputs, window inputs), each a keyed sample of its task's data."""
    ref_x = _inputs(job, plan.reference_task)
    ref_order = keyed_order(ref_x.numpy(), key, b"drift-sample")
    if plan.window_task == plan.reference_task:
        window = ref_order[: plan.window]
        reference = ref_order[plan.window : plan.window + plan.reference]
        return ref_x[reference], ref_x[window]
    win_x = _inputs(job, plan.window_task)
    win_order = keyed_order(win_x.numpy(), key, b"drift-sample")
    return ref_x[ref_order[: plan.reference]], win_x[win_order[: plan.window]]


def embed(model: nn.Module, x: torch.Tensor, *, mask=None, device: str = "cpu", batch: int = 512):
    """(embeddings, predicted classes) of ``x``: the input of the model's last linear layer."""
    from .trainer import masked_logits

    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise FedclError("drift monitoring needs a model whose head is a linear layer")
    seen: list[torch.Tensor] = []
    handle = last[-1].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    model.to(device).eval()
    preds = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch):
                logits = masked_logits(model(x[start : start + batch].to(device)), mask)
                preds.append(logits.argmax(1).cpu())
    finally:
        handle.remove()
    emb = torch.cat([t.flatten(1).cpu() for t in seen]).double().numpy()
    return emb, torch.cat(preds).numpy()


def report(job: SiteJob, model: nn.Module, *, generator: np.random.Generator | None = None):
    """This round's :class:`~fedcl.continual.drift.DriftReport` at this site."""
    spec = job.experiment.drift
    if generator is None and (seed := job.noise_seed("dp-drift")) is not None:
        generator = np.random.default_rng(seed)  # the site's research seed (config/site.py)
    plan = plan_window(job)
    key = site_key(job)
    ref_x, win_x = _samples(job, plan, key)
    mask = job.data.stream.train_mask(job.task_index)
    ref_e, ref_p = embed(model, ref_x, mask=mask, device=job.site.device)
    win_e, win_p = embed(model, win_x, mask=mask, device=job.site.device)
    fitted = ref_e if spec.projection == "pca" else None
    ref_z = project(ref_e, spec.dim, seed=job.experiment.seed, reference=fitted)
    win_z = project(win_e, spec.dim, seed=job.experiment.seed, reference=fitted)
    result = assess(
        ref_z,
        win_z,
        ref_p,
        win_p,
        job.data.stream.num_outputs,
        settings_of(job.experiment),
        key=key,
        generator=generator,
    )
    logger.info(
        "site %s round %d drift (kept at the site): task %d vs %d, %s",
        job.site.site_id,
        job.server_round,
        plan.window_task,
        plan.reference_task,
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                  sorted(result.local.items())),
    )  # fmt: skip
    return result


def refusal(job: SiteJob):
    """The site's policy on a drift report, before any data is used (None: it may answer).

    A site that requires DP sends no drift report computed without it; under DP the report's
    σ must meet ``privacy.min_noise_multiplier`` like any release.
    """
    from fedcl.config.vocabulary import RefusalRule

    from .privacy_site import PolicyRefusal

    policy = job.site.privacy
    if not job.experiment.dp.enabled:
        if not policy.require_dp:
            return None
        return PolicyRefusal(
            RefusalRule.REQUIRE_DP,
            f"site policy {RefusalRule.REQUIRE_DP}: the experiment has DP off (this site sends "
            "no drift report computed from its data without DP)",
        )
    floor = policy.min_noise_multiplier
    sigma = job.experiment.drift.noise_multiplier
    if floor is not None and sigma < floor:
        return PolicyRefusal(
            RefusalRule.MIN_NOISE,
            f"site policy {RefusalRule.MIN_NOISE} = {float(floor)}: the drift report's σ would "
            f"be {sigma:.3g} (drift.noise_multiplier)",
        )
    return None
