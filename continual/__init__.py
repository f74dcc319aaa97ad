"""Continual learning: task streams (scenarios), forgetting metrics, EWC and replay."""

from importlib import import_module
from typing import TYPE_CHECKING

from .metrics import average_accuracy, backward_transfer, forward_transfer, summarize
from .streams import SCENARIOS, Stream, TaskDef, build_stream

if TYPE_CHECKING:
    from .ewc import EWCHook, EWCMemory, check_ewc_settings, parameter_dict, plain_name
    from .fisher import (
        FisherRelease,
        check_fisher_dp_settings,
        dp_fisher_diagonal,
        fisher_diagonal,
        fisher_from_sum,
        fisher_share,
    )
    from .replay import ReplayBuffer, check_replay_policy, check_replay_size, mixed_dataset

__all__ = [
    "SCENARIOS",
    "Stream",
    "TaskDef",
    "average_accuracy",
    "backward_transfer",
    "build_stream",
    "forward_transfer",
    "summarize",
    # EWC, Fisher and replay (issue #5)
    "EWCHook",
    "EWCMemory",
    "FisherRelease",
    "ReplayBuffer",
    "check_ewc_settings",
    "check_fisher_dp_settings",
    "check_replay_policy",
    "check_replay_size",
    "dp_fisher_diagonal",
    "fisher_diagonal",
    "fisher_from_sum",
    "fisher_share",
    "mixed_dataset",
    "parameter_dict",
    "plain_name",
]

# EWC, Fisher and replay import torch; they load on first use so that the coordinator, the
# dashboard and the CLI, which only need streams and metrics, do not pay for it.
_LAZY = {
    "EWCHook": "ewc",
    "EWCMemory": "ewc",
    "check_ewc_settings": "ewc",
    "parameter_dict": "ewc",
    "plain_name": "ewc",
    "FisherRelease": "fisher",
    "check_fisher_dp_settings": "fisher",
    "dp_fisher_diagonal": "fisher",
    "fisher_diagonal": "fisher",
    "fisher_from_sum": "fisher",
    "fisher_share": "fisher",
    "ReplayBuffer": "replay",
    "check_replay_policy": "replay",
    "check_replay_size": "replay",
    "mixed_dataset": "replay",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
