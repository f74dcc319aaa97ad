"""The site's half of continual learning: the method's hooks, replay from its own past data, Fisher.

What a method does at a site is declared in its row of :mod:`fedcl.continual.methods`; this
module hands the row what the site knows (:func:`site_context`). The replay buffer is private
site state (it holds raw examples) and lives in the site's state folder; it is refilled
idempotently from the site's own data of every earlier task, so a site that missed a task still
replays it. The EWC memory is global state and comes from the coordinator (see
:mod:`fedcl.client.job`).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from fedcl.config import FedclError
from fedcl.continual.methods import SiteContext, get_method
from fedcl.continual.replay import (
    ReplayBuffer,
    ReplayBufferMismatch,
    check_replay_size,
    mixed_dataset,
)
from fedcl.continual.replay_keys import load_or_create_key

from .job import SiteJob

logger = logging.getLogger("fedcl.client")

REPLAY_FILE = "replay.safetensors"
#: DP group size of a DP-SGD release over (task ∪ replay buffer); see :func:`training_set`.
REPLAY_GROUP_SIZE = 2


def site_context(
    job: SiteJob, model: torch.nn.Module, data: Dataset, memory: object = None
) -> SiteContext:
    """What this site knows for one training message, for the method's hook factory.

    ``model`` is the global model as received (before training), ``data`` the round's training
    set, ``memory`` the consolidated global state for methods that consolidate.
    """
    return SiteContext(
        experiment=job.experiment,
        stream=job.data.stream,
        data=data,
        state_dir=job.state_dir,
        model=model,
        run_id=job.run_id,
        site_id=job.site.site_id,
        task_index=job.task_index,
        round_in_task=job.round_in_task,
        server_round=job.server_round,
        memory=memory,
    )


def replay_buffer(job: SiteJob) -> ReplayBuffer:
    """This run's buffer, holding examples of every task before the current one.

    Membership is keyed bottom-k (:mod:`fedcl.continual.replay`) under the site's secret key
    (``replay.key`` in the site's state folder, created once with mode 0600), so the buffer is
    a function of the site's own data of the earlier tasks: refilled idempotently (one tag per
    task), a task the site missed is added when it next trains, with the same result as if it
    had never missed it. A buffer file of an older format, another key, capacity or policy is
    rebuilt from the site's data rather than continued.
    """
    spec = job.experiment.continual
    check_replay_size(spec.replay_size, len(job.data.train), job.site.site_id)
    key = load_or_create_key(job.site.state_dir, research_seed=job.site.privacy.research_seed)
    path = job.state_dir / REPLAY_FILE
    buffer = None
    if path.exists():
        try:
            buffer = ReplayBuffer.load(path, key=key)
        except ReplayBufferMismatch as why:
            logger.info("site %s: %s", job.site.site_id, why)
        if buffer is not None and (buffer.capacity, buffer.policy) != (
            spec.replay_size,
            spec.replay_policy,
        ):
            buffer = None
    changed = buffer is None
    if buffer is None:
        buffer = ReplayBuffer(spec.replay_size, spec.replay_policy, key=key)
    for k in range(job.task_index):
        changed |= buffer.add_dataset(job.data.train_set(k), tag=f"task-{k}")
    if changed:
        buffer.save(path)
    return buffer


def replays_buffer(job: SiteJob, task: int | None = None) -> bool:
    """Whether the training set of ``task`` (default: this message's) includes a replay buffer.

    It does when the method replays (not in joint training) and an earlier task has examples at
    this site: the buffer is refilled from all of them, so it is then non-empty.
    """
    task = job.task_index if task is None else task
    if not get_method(job.experiment.continual.method).replays or job.experiment.is_joint:
        return False
    return any(len(job.data.train_set(k)) > 0 for k in range(task))


def task_group_size(job: SiteJob, task: int) -> int:
    """The DP group size of DP-SGD at ``task``: 2 over (task ∪ replay buffer), else 1.

    See :func:`training_set`: one example of the site's data changes a later task's training
    set by up to two records under add/remove adjacency. For planning a whole run's σ.
    """
    return REPLAY_GROUP_SIZE if replays_buffer(job, task) else 1


def training_group_size(job: SiteJob) -> int:
    """The group size of this message's DP-SGD release (what the ledger must be charged)."""
    return task_group_size(job, job.task_index)


def training_set(job: SiteJob) -> Dataset:
    """The current task's examples, plus the replay buffer when the method replays.

    Under DP the buffer's examples are part of the dataset that Poisson sampling draws from,
    so the sample rate and the accounting use N = len(task) + len(buffer).

    **What a DP-SGD release over (task ∪ buffer) protects.** Opacus' RDP accountant (the
    sampled Gaussian mechanism of Mironov, Talwar & Zhang, 2019) bounds the Rényi divergence,
    in both directions, between runs on training sets that differ by *adding or removing one
    record*, with Poisson sampling; that is the adjacency every ε in the ledger refers to.
    Take the site's whole data ``D`` and ``D' = D ∪ {z}``, ``z`` an example of task ``j``, and
    the training set of task ``t``, ``S_t = D_t ∪ B_t`` with ``B_t`` the keyed bottom-k of the
    tasks before ``t``:

    * ``t < j``: ``S_t`` is unchanged (``z`` is neither in ``D_t`` nor in the earlier tasks);
    * ``t = j``: ``S'_t = S_t ∪ {z}`` (``B_t`` depends on earlier tasks only): one record;
    * ``t > j``: ``B'_t`` differs from ``B_t`` in at most one slot: unchanged, ``z`` added (the
      buffer was not full), or ``z`` in and one example ``y`` out. ``y`` is still in the site's
      data, but no longer in the training set: ``S'_t = S_t - {y} ∪ {z}``, *two* add/remove
      steps (a substitution).

    So under the accountant's add/remove adjacency the group size is **2**, not 1, for every
    release that trains on a non-empty buffer, and no more than 2 (the pair is a substitution
    ``y -> z``; a group of 2 also covers two additions, so the bound is conservative, but Opacus
    has no accountant for substitutions under Poisson sampling). Such a release must be charged
    with ``group_size = 2`` (:func:`training_group_size`; :func:`task_group_size` for planning);
    the ledger composes it with RDP group privacy (Mironov 2017, Prop. 11 with p = q = 2:
    ``ε₂(α) ≤ (α - ½)/(α - 1)·ε(2α) + ε(2α - 1)``, through the intermediate training set
    ``S_t - {y}``), which for the same σ, q and steps is about 2–3.5 times the ε at group size
    1. DP-SGD on the first task (no buffer yet), a method without replay and the DP Fisher (the
    task's own examples only) stay at group size 1. That bottom-k moves at most one slot is what
    keeps this at 2: the old draw-dependent reservoir moved 73–76 of 100 slots when one example
    was removed, i.e. training sets up to ~150 records apart.
    """
    task = job.data.train_set(job.task_index)
    if not replays_buffer(job):
        return task
    buffer = replay_buffer(job)
    return mixed_dataset(task, buffer) if len(buffer) else task


def site_fisher(
    job: SiteJob, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], int, object]:
    """(F on this task's data, examples used, DP release or None) at the global model.

    Under DP the mechanism runs with the settings of the method's stated release
    (:func:`consolidation_release`, what the site charged) and must report that same release.
    """
    from fedcl.continual.fisher import dp_fisher_diagonal, fisher_diagonal

    spec = job.experiment.continual
    data = job.data.train_set(job.task_index)
    mask = job.data.stream.train_mask(job.task_index)
    model.to(job.site.device)  # the Fisher runs where the parameters are (fisher.py)
    if job.experiment.dp.enabled:
        stated = consolidation_release(job)
        seed = job.noise_seed("dp-fisher")
        fisher, release = dp_fisher_diagonal(
            model,
            data,
            clip_norm=stated.clip_norm,
            noise_multiplier=stated.noise_multiplier,
            squared_clip_norm=stated.squared_clip_norm,
            output_mask=mask,
            batch_size=spec.fisher_batch_size,
            clamp=False,
            generator=None if seed is None else torch.Generator().manual_seed(seed),
        )
        if release != stated:  # the ledger was charged with ``stated``
            raise FedclError(
                f"site {job.site.site_id}: the DP Fisher reported {release}, but the site "
                f"charged {stated}; refusing to send it"
            )
        return fisher, len(data), release
    return (
        fisher_diagonal(model, data, output_mask=mask, batch_size=spec.fisher_batch_size),
        len(data),
        None,
    )


def consolidation_release(job: SiteJob):
    """The DP release this site's consolidation of the current task makes (``FisherRelease``).

    From the method's row (:meth:`ContinualMethod.consolidation_release`), for the examples the
    mechanism will use; a FedclError for a method that does not consolidate.
    """
    method = get_method(job.experiment.continual.method)
    release = method.consolidation_release(job.experiment, len(job.data.train_set(job.task_index)))
    if release is None:
        raise FedclError(
            f"continual.method = {method.name!r} makes no consolidation release; only methods "
            "that consolidate (EWC) have a consolidation round"
        )
    return release
