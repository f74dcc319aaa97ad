"""The site's half of continual learning: replay from its own past data, EWC hooks, Fisher.

The replay buffer is private site state (it holds raw examples) and lives in the site's state
folder; it is refilled idempotently from the site's own data of every earlier task, so a site
that missed a task still replays it. The EWC memory is global state and comes from the
coordinator (see :mod:`fedcl.client.job`).
"""

from __future__ import annotations

import zlib

import torch
from torch.utils.data import Dataset

from fedcl.continual.replay import ReplayBuffer, check_replay_size, mixed_dataset

from .job import SiteJob


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
    if not job.experiment.continual.uses_replay or job.experiment.is_joint:
        return task
    buffer = replay_buffer(job)
    return mixed_dataset(task, buffer) if len(buffer) else task


def site_fisher(
    job: SiteJob, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], int, object]:
    """(F on this task's data, examples used, DP release or None) at the global model."""
    from fedcl.continual.fisher import dp_fisher_diagonal, fisher_diagonal

    spec = job.experiment.continual
    data = job.data.train_set(job.task_index)
    mask = job.data.stream.train_mask(job.task_index)
    if job.experiment.dp.enabled:
        fisher, release = dp_fisher_diagonal(
            model,
            data,
            clip_norm=spec.fisher_clip_norm,
            noise_multiplier=spec.fisher_noise_multiplier,
            output_mask=mask,
            batch_size=spec.fisher_batch_size,
            clamp=False,
        )
        return fisher, len(data), release
    return (
        fisher_diagonal(model, data, output_mask=mask, batch_size=spec.fisher_batch_size),
        len(data),
        None,
    )
