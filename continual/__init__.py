"""Continual learning: task streams (scenarios), forgetting metrics, EWC and replay."""

from .metrics import average_accuracy, backward_transfer, forward_transfer, summarize
from .streams import SCENARIOS, Stream, TaskDef, build_stream

__all__ = [
    "SCENARIOS",
    "Stream",
    "TaskDef",
    "average_accuracy",
    "backward_transfer",
    "build_stream",
    "forward_transfer",
    "summarize",
]
