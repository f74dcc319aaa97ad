"""Which of a site's data cells each release reads, and whether the run may use them.

The ledger's rule (:mod:`fedcl.privacy.ledger.cells`) makes a site's ε the max over its data
cells of the composition of the releases touching each, where a cell is fixed by each record's
own attributes: ``train:task-<k>`` (a training record of task ``k``, by its class, domain or
explicit task) and ``test:task-<j>`` (a test record of evaluation task ``j``). That is only
sound if every release names *every* cell whose records it may read, directly or through site
state computed from them without DP. This module is the site's one statement of it, decided
conservatively (docs/DESIGN.md §9):

* The run is accounted in cells (:func:`composition`) only when ``dp.composition =
  "parallel"``, the site's ``privacy.allow_parallel_composition`` allows it, the method's row
  says its task-``t`` releases read task ``t`` alone (``ContinualMethod.cell_disjoint``: naive,
  EWC, LwF, SI; not replay nor joint training), the stream is not joint and no two training
  tasks can share a record. Otherwise every release is universal: today's sequential
  composition of the whole run, and the site's log says why.
* DP-SGD of task ``t`` and its DP Fisher: ``train:task-t``. A noised evaluation: the test cells
  of every task it scores. A drift report: the training cells of the reference and window tasks
  it samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from fedcl.continual.streams import TaskDef
from fedcl.privacy.ledger import UNIVERSAL_CELLS

#: Every evaluation task's test records, when the evaluation tasks may overlap.
ALL_TEST = "test:all"


@dataclass(frozen=True)
class Composition:
    """How a run is accounted at a site: in data cells (``parallel``) or sequentially, and why."""

    parallel: bool
    reason: str

    @property
    def name(self) -> str:
        return "parallel" if self.parallel else "sequential"


def composition(job: Any) -> Composition:
    """Whether this run's releases at this site are charged to their data cells.

    ``job`` is a :class:`~fedcl.client.job.SiteJob` or a planning stand-in with the same
    ``experiment``, ``site`` and ``data``.
    """
    from fedcl.continual.methods import get_method

    ruled_out = job.plan.cells_ruled_out  # the experiment's part, shared with the coordinator
    if ruled_out is not None:
        return Composition(False, ruled_out)
    if not job.site.privacy.allow_parallel_composition:
        return Composition(False, "site policy privacy.allow_parallel_composition = false")
    method = get_method(job.experiment.continual.method)
    stream = job.data.stream
    explicit = job.data.train.task is not None
    for a, b in itertools.combinations(stream.tasks, 2):
        if not disjoint(a, b, explicit=explicit):
            return Composition(False, f"tasks {a.index} and {b.index} may share records")
    return Composition(True, f"{method.name} reads only each task's own records")


def disjoint(a: TaskDef, b: TaskDef, *, explicit: bool) -> bool:
    """Whether no record can belong to both tasks (``Stream.select``'s filters, by attribute).

    ``explicit``: the site's data carries an explicit task column (else that filter is off).
    """
    if not set(a.classes) & set(b.classes):
        return True
    if a.domains is not None and b.domains is not None and not set(a.domains) & set(b.domains):
        return True
    return (
        explicit
        and a.explicit_task is not None
        and b.explicit_task is not None
        and a.explicit_task != b.explicit_task
    )


def train_cells(job: Any, task: int, mode: Composition | None = None) -> tuple[str, ...]:
    """The cells of a release over task ``task``'s training records (DP-SGD, DP Fisher)."""
    mode = composition(job) if mode is None else mode
    return (f"train:task-{task}",) if mode.parallel else UNIVERSAL_CELLS


def drift_cells(job: Any, tasks: tuple[int, ...], mode: Composition | None = None):
    """The cells of a drift report sampling the training records of ``tasks``."""
    mode = composition(job) if mode is None else mode
    if not mode.parallel:
        return UNIVERSAL_CELLS
    return tuple(sorted({f"train:task-{k}" for k in tasks}))


def test_cells(job: Any, mode: Composition | None = None) -> tuple[str, ...]:
    """The cells of an evaluation over every evaluation task's test records."""
    mode = composition(job) if mode is None else mode
    if not mode.parallel:
        return UNIVERSAL_CELLS
    tasks = job.data.stream.evaluation_tasks
    explicit = job.data.test.task is not None
    if all(disjoint(a, b, explicit=explicit) for a, b in itertools.combinations(tasks, 2)):
        return tuple(f"test:task-{j}" for j in range(len(tasks)))
    return (ALL_TEST,)
