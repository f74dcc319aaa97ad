"""A site's per-round scoring of the global model on every task's test set (the accuracy matrix).

Every round evaluates every task (R[i][j] needs all of them), so this runs once per message on
a handful of small test sets. :func:`fedcl.client.trainer.evaluate` scores one dataset through
a ``DataLoader`` and moves the model and sets eval mode each call; on the digits test sets
(2-20 images a task) that overhead was ~7x the forward passes (3.7 ms against 0.5 ms a message
for five tasks). Here the model is prepared once, a ``TensorDataset`` (what
:class:`~fedcl.client.site.SiteData` holds) is cut into the same 512-row batches by slicing
instead of collating example by example, and the numbers are those of ``evaluate``: the same
batches, the same forward passes, the loss summed in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedcl.models.registry import Objective, objective_of

from .device import place, resolve_device
from .trainer import masked_logits

#: ``evaluate``'s batch size: the same batches give bit-identical sums.
EVAL_BATCH_SIZE = 512


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """The batches a ``DataLoader(dataset, batch_size)`` yields, sliced when tensors allow."""
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        n = len(tensors[0]) if tensors else 0
        for start in range(0, n, batch_size):
            yield [t[start : start + batch_size] for t in tensors]
        return
    yield from DataLoader(dataset, batch_size=batch_size)


def score_tasks(
    model: nn.Module,
    datasets: Sequence[Dataset],
    *,
    output_masks: Sequence[Sequence[int] | None],
    device: str | torch.device = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    objective: Objective | None = None,
) -> list[tuple[int, int, float]]:
    """(summed metric, count, summed loss) of ``model`` on each dataset, with its task's mask.

    The same values as :func:`fedcl.client.trainer.evaluate` on each dataset in turn (the test
    in tests/test_scoring.py compares them), without its per-dataset set-up.
    """
    if len(datasets) != len(output_masks):
        raise ValueError(f"{len(datasets)} datasets but {len(output_masks)} output masks")
    objective = objective_of(model) if objective is None else objective
    device = resolve_device(str(device))
    place(model, device).eval()
    results = []
    with torch.inference_mode():
        for dataset, mask in zip(datasets, output_masks, strict=True):
            correct, count, loss = 0, 0, 0.0
            for batch in _batches(dataset, batch_size):
                x, y = objective.split_batch(batch)
                x, y = x.to(device), y.to(device)
                logits = masked_logits(model(x), mask)
                loss += float(objective.loss(logits, y, reduction="sum"))
                correct += int(objective.metric(logits, y))
                count += len(y)
            results.append((correct, count, loss))
    return results
