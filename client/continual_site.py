"""The site's half of continual learning: the method's hooks, replay from its own past data, Fisher.

What a method does at a site is declared in its row of :mod:`fedcl.continual.methods`; this
module hands the row what the site knows (:func:`site_context`). The replay buffer is private
site state (it holds raw examples) and lives in the site's state folder; it is refilled
idempotently from the site's own data of every earlier task, so a site that missed a task still
replays it. The EWC memory is global state and comes from the coordinator (see
:mod:`fedcl.client.job`).
"""

from __future__ import annotations

import zlib

import torch
from torch.utils.data import Dataset

from fedcl.config import FedclError
from fedcl.continual.methods import SiteContext, get_method
from fedcl.continual.replay import ReplayBuffer, check_replay_size, mixed_dataset

from .job import SiteJob


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
    """This run's buffer, holding examples of every task before the current one."""
    spec = job.experiment.continual
    check_replay_size(spec.replay_size, len(job.data.train), job.site.site_id)
    path = job.state_dir / "replay.safetensors"
    if path.exists():
        buffer = ReplayBuffer.load(path)
    else:
        seed = job.experiment.seed * 7919 + zlib.crc32(job.site.site_id.encode())
        buffer = ReplayBuffer(spec.replay_size, spec.replay_policy, seed=seed)
    changed = False
    for k in range(job.task_index):
        changed |= buffer.add_dataset(job.data.train_set(k), tag=f"task-{k}")
    if changed:
        buffer.save(path)
    return buffer


def training_set(job: SiteJob) -> Dataset:
    """The current task's examples, plus the replay buffer when the method replays.

    Under DP the buffer's examples are part of the dataset that Poisson sampling draws from,
    so the sample rate and the accounting use N = len(task) + len(buffer).
    """
    task = job.data.train_set(job.task_index)
    if not get_method(job.experiment.continual.method).replays or job.experiment.is_joint:
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
    if job.experiment.dp.enabled:
        stated = consolidation_release(job)
        fisher, release = dp_fisher_diagonal(
            model,
            data,
            clip_norm=stated.clip_norm,
            noise_multiplier=stated.noise_multiplier,
            squared_clip_norm=stated.squared_clip_norm,
            output_mask=mask,
            batch_size=spec.fisher_batch_size,
            clamp=False,
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
