"""Continual scenarios and forgetting metrics, with numbers checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.config import ConfigError
from fedcl.continual import backward_transfer, build_stream, forward_transfer, summarize


def test_class_il_splits_classes_and_keeps_labels() -> None:
    s = build_stream("class-il", num_classes=10, num_tasks=5)
    assert [t.classes for t in s.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert s.num_outputs == 10 and s.train_mask(0) is None
    y = np.arange(10)
    assert list(s.select(s.tasks[2], y)) == [4, 5]
    assert list(s.targets(np.array([4, 5]))) == [4, 5]


def test_domain_il_single_domain_is_split_parity() -> None:
    s = build_stream("domain-il", num_classes=10, num_tasks=5)
    assert s.num_outputs == 2
    assert list(s.targets(np.array([6, 7, 8, 9]))) == [0, 1, 0, 1]


def test_domain_il_with_domains_groups_domains() -> None:
    s = build_stream("domain-il", num_classes=4, num_tasks=2, domain_names=("a", "b", "c", "d"))
    assert [t.domains for t in s.tasks] == [(0, 1), (2, 3)]
    y = np.array([0, 1, 2, 3])
    dom = np.array([0, 2, 1, 3])
    assert list(s.select(s.tasks[1], y, dom)) == [1, 3]


def test_task_il_masks_to_the_task() -> None:
    s = build_stream("task-il", num_classes=10, num_tasks=5)
    assert s.train_mask(3) == (6, 7) and s.eval_mask(1) == (2, 3)
    j = s.joint()
    assert j.num_tasks == 1 and len(j.evaluation_tasks) == 5
    assert j.train_mask(0) is None and j.eval_mask(4) == (8, 9)


def test_impossible_streams_name_the_field() -> None:
    with pytest.raises(ConfigError, match="data.num_tasks"):
        build_stream("class-il", num_classes=3, num_tasks=5)
    with pytest.raises(ConfigError, match="divide"):
        build_stream("domain-il", num_classes=10, num_tasks=3)


def test_metrics_by_hand() -> None:
    r = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.9]]
    b = [0.1, 0.1, 0.2]
    # BWT = mean(0.5-0.9, 0.7-0.8) = -0.25 ; FWT = mean(0.1-0.1, 0.3-0.2) = 0.05
    assert backward_transfer(r) == pytest.approx(-0.25)
    assert forward_transfer(r, b) == pytest.approx(0.05)
    assert summarize(r, b)["avg_accuracy"] == pytest.approx(0.7)
    assert backward_transfer([[0.5]]) is None
    # No earlier task scored both after its training and at the end: undefined, not NaN.
    assert backward_transfer([[None, 0.4], [0.7, 0.6]]) is None
