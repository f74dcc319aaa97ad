"""The per-round scoring of every task (``client.scoring``) gives ``trainer.evaluate``'s numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from fedcl.client.scoring import score_tasks
from fedcl.client.trainer import evaluate, masked_logits
from fedcl.models.registry import build_model, objective_of


class _Listed(Dataset):
    """Not a TensorDataset: scored through a DataLoader, as ``evaluate`` does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _one_by_one(model, dataset, mask) -> tuple[int, int, float]:
    """The reference: a DataLoader over ``dataset``, summed batch by batch (evaluate's old loop)."""
    objective = objective_of(model)
    model.eval()
    correct, count, loss = 0, 0, 0.0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=512):
            x, y = objective.split_batch(batch)
            logits = masked_logits(model(x), mask)
            loss += float(objective.loss(logits, y, reduction="sum"))
            correct += int(objective.metric(logits, y))
            count += len(y)
    return correct, count, loss


def test_score_tasks_equals_evaluate_per_task() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=4)
    model.train()  # scoring must switch to eval mode itself

    def task(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, 1, 8, 8), torch.randint(0, 4, (n,))

    sets = [
        TensorDataset(*task(20)),
        TensorDataset(*task(1100)),  # three batches of 512, 512, 76
        TensorDataset(*task(0)),
        _Listed(*task(37)),
        TensorDataset(*task(9)),
    ]
    masks = [None, None, None, [1, 2], [0, 3]]
    expected = [_one_by_one(model, d, m) for d, m in zip(sets, masks, strict=True)]
    model.train()
    assert [evaluate(model, d, output_mask=m) for d, m in zip(sets, masks, strict=True)] == expected
    model.train()
    got = score_tasks(model, sets, output_masks=masks)
    assert got == expected  # exact: same batches, same sums
    assert [c for _, c, _ in got] == [20, 1100, 0, 37, 9]
    assert not model.training
    assert 0 < sum(k for k, _, _ in got) < 1166
    with pytest.raises(ValueError, match="output masks"):
        score_tasks(model, sets, output_masks=masks[:2])
