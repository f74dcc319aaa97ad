"""Continual scenarios: how one labelled dataset is cut into a sequence of tasks.

A :class:`Stream` is defined from the dataset's *metadata* (classes, domains), never from a
site's examples, so every site derives the same tasks from its own shard and the coordinator can
name the tasks without seeing any data. The three scenarios follow van de Ven & Tolias (2019):

* class-incremental: task t brings new classes; one shared head over all classes seen.
* task-incremental: the same class split, but the task identity is known at test time, so the
  logits are masked to the task's classes.
* domain-incremental: the label space stays fixed while the input distribution moves. With a
  dataset that has domains (materials, lightings, scanners) a task is a group of domains; with a
  single-domain dataset (digits) it is the classic "split" domain-IL: task t holds classes
  {2t, 2t+1} and the model predicts the position within the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedcl.config import ConfigError

SCENARIOS = ("class-il", "domain-il", "task-il")


@dataclass(frozen=True)
class TaskDef:
    """One experience of the stream."""

    index: int
    name: str
    classes: tuple[int, ...]
    domains: tuple[int, ...] | None = None
    explicit_task: int | None = None


@dataclass(frozen=True)
class Stream:
    """A task sequence plus the label mapping the model is trained with."""

    scenario: str
    tasks: tuple[TaskDef, ...]
    num_outputs: int
    label_map: tuple[int, ...]
    masked: bool = False
    eval_tasks: tuple[TaskDef, ...] = field(default=())
    #: Held-out classes no task trains on, evaluated after every task (zero-shot, §11).
    zero_shot: TaskDef | None = None
    #: Train each task against its own classes only (a dual encoder's class prompts, §11).
    task_prompts: bool = False

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def evaluation_tasks(self) -> tuple[TaskDef, ...]:
        """Tasks accuracy is reported on (the sequential tasks, also for a joint stream), then
        the held-out classes when the stream has them (the accuracy matrix's zero-shot column)."""
        tasks = self.eval_tasks or self.tasks
        return tasks if self.zero_shot is None else (*tasks, self.zero_shot)

    def select(
        self,
        task: TaskDef,
        y: np.ndarray,
        domain: np.ndarray | None = None,
        explicit: np.ndarray | None = None,
    ) -> np.ndarray:
        """Indices of the examples (of any shard) that belong to ``task``."""
        mask = np.isin(y, np.asarray(task.classes, dtype=np.int64))
        if task.domains is not None and domain is not None:
            mask &= np.isin(domain, np.asarray(task.domains, dtype=np.int64))
        if task.explicit_task is not None and explicit is not None:
            mask &= explicit == task.explicit_task
        return np.flatnonzero(mask)

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Map dataset labels to model outputs (identity except in split domain-IL)."""
        return np.asarray(self.label_map, dtype=np.int64)[y]

    def train_mask(self, task_index: int) -> tuple[int, ...] | None:
        """Outputs a task trains on: task-IL knows the task, so the head is masked to it."""
        if self.task_prompts:  # the task's prompts (a joint task's: every trained class)
            return self.tasks[task_index].classes
        if not self.masked or self.eval_tasks:
            return None  # joint training mixes tasks: no single mask applies
        return self.tasks[task_index].classes

    def eval_mask(self, eval_index: int) -> tuple[int, ...] | None:
        """Outputs allowed when evaluating on evaluation task ``eval_index`` (task-IL only)."""
        if not self.masked or self.evaluation_tasks[eval_index] is self.zero_shot:
            return None  # zero-shot: every class's prompt competes
        return self.evaluation_tasks[eval_index].classes

    def joint(self) -> Stream:
        """All tasks at once: the upper reference every continual method is compared with."""
        classes = tuple(sorted({c for t in self.tasks for c in t.classes}))
        domains = None
        if all(t.domains is not None for t in self.tasks):
            domains = tuple(sorted({d for t in self.tasks for d in t.domains or ()}))
        everything = TaskDef(0, "joint", classes, domains)
        return Stream(
            scenario=self.scenario,
            tasks=(everything,),
            num_outputs=self.num_outputs,
            label_map=self.label_map,
            masked=self.masked,
            eval_tasks=self.tasks,
            zero_shot=self.zero_shot,
            task_prompts=self.task_prompts,
        )


def _split(items: list[int], parts: int, what: str, field_name: str) -> list[tuple[int, ...]]:
    if parts > len(items):
        raise ConfigError(
            f"field '{field_name}': {parts} tasks need at least {parts} {what}, "
            f"the dataset has {len(items)}; use num_tasks <= {len(items)}"
        )
    return [tuple(int(i) for i in chunk) for chunk in np.array_split(np.asarray(items), parts)]


def build_stream(
    scenario: str,
    *,
    num_classes: int,
    num_tasks: int,
    class_names: tuple[str, ...] | None = None,
    domain_names: tuple[str, ...] = ("default",),
    held_out: tuple[int, ...] = (),
    task_prompts: bool = False,
) -> Stream:
    """Cut a dataset with ``num_classes`` classes and ``domain_names`` into ``num_tasks`` tasks.

    ``held_out`` classes (a captioned dataset's unseen compositions) are in no task; they form
    a last evaluation column, ``zero_shot``. ``task_prompts`` trains each task against its own
    classes (a dual encoder compares an image with the task's class prompts only).
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"field 'data.scenario': {scenario!r} is not one of {SCENARIOS}")
    stream = _build_stream(scenario, num_classes, num_tasks, class_names, domain_names, held_out)
    if not held_out and not task_prompts:
        return stream
    if stream.label_map != tuple(range(num_classes)):
        raise ConfigError(
            "field 'data.scenario': held-out classes and class prompts need one output per "
            "class; split domain-IL on a single-domain dataset relabels classes (use class-il, "
            "task-il or a dataset with domains)"
        )
    zero = None
    if held_out:
        name = f"zero-shot ({len(held_out)} held-out classes)"
        zero = TaskDef(len(stream.tasks), name, tuple(held_out))
    return replace(stream, zero_shot=zero, task_prompts=task_prompts)


def _build_stream(
    scenario: str,
    num_classes: int,
    num_tasks: int,
    class_names: tuple[str, ...] | None,
    domain_names: tuple[str, ...],
    held_out: tuple[int, ...],
) -> Stream:
    seen = [c for c in range(num_classes) if c not in set(held_out)]
    names = class_names or tuple(str(c) for c in range(num_classes))
    identity = tuple(range(num_classes))

    if scenario in ("class-il", "task-il"):
        groups = _split(seen, num_tasks, "classes", "data.num_tasks")
        tasks = tuple(
            TaskDef(i, "classes " + ",".join(names[c] for c in g), g) for i, g in enumerate(groups)
        )
        return Stream(scenario, tasks, num_classes, identity, masked=scenario == "task-il")

    # domain-incremental
    if len(domain_names) > 1:
        groups = _split(list(range(len(domain_names))), num_tasks, "domains", "data.num_tasks")
        tasks = tuple(
            TaskDef(i, "+".join(domain_names[d] for d in g), tuple(seen), g)
            for i, g in enumerate(groups)
        )
        return Stream(scenario, tasks, num_classes, identity)

    if num_classes % num_tasks:
        raise ConfigError(
            f"field 'data.num_tasks': split domain-IL on a single-domain dataset needs "
            f"num_tasks to divide the {num_classes} classes (e.g. "
            f"{[d for d in range(1, num_classes + 1) if num_classes % d == 0]})"
        )
    per_task = num_classes // num_tasks
    groups = [tuple(range(i * per_task, (i + 1) * per_task)) for i in range(num_tasks)]
    label_map = tuple(c % per_task for c in range(num_classes))
    tasks = tuple(
        TaskDef(i, "classes " + ",".join(names[c] for c in g), g) for i, g in enumerate(groups)
    )
    return Stream(scenario, tasks, per_task, label_map)
