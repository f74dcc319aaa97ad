"""What the ledger records: one release of a Gaussian mechanism, and what a site spent.

:class:`DPRelease` is a mechanism's raw parameters (σ, q, steps, δ), :class:`LedgerEntry` one
line of the ledger file (a release, where and when); :class:`LedgerSummary` with its
:class:`RunSpend` and :class:`TaskSpend` is what ``fedcl privacy`` shows, and
:class:`SpendDecision` the outcome of charging a release against a budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedcl.config.errors import FedclError

SCHEMA_VERSION = 1
#: The version of a line whose release has ``group_size > 1``: a reader that predates group
#: sizes refuses it (as "written by a newer fedcl") instead of composing it at group size 1.
GROUP_SCHEMA_VERSION = 2
SCHEMA_VERSIONS: tuple[int, ...] = (SCHEMA_VERSION, GROUP_SCHEMA_VERSION)
#: RDP group privacy doubles the orders once per member (order 2^(k-1)·α): beyond a few members
#: the bound is useless and a larger group means the release needs another design.
MAX_GROUP_SIZE = 4
#: The cell of a release that reads (or may read) any of the site's data: it composes with
#: every cell (:mod:`.cells`). Entries written before cells existed are in it.
UNIVERSAL = "*"
UNIVERSAL_CELLS: tuple[str, ...] = (UNIVERSAL,)
Accountant = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


class LedgerError(FedclError):
    """The ledger cannot be read or written (corrupt line, bad entry, unusable directory)."""


@dataclass(frozen=True)
class DPRelease:
    """One release of a (Poisson-subsampled) Gaussian mechanism, as the accountant needs it.

    ``noise_multiplier`` is the noise standard deviation divided by the L2 sensitivity (for
    DP-SGD: by ``max_grad_norm``), ``sample_rate`` the Poisson inclusion probability of each
    example (1.0 for a full-data release such as a Fisher diagonal), ``steps`` how many times
    the mechanism ran. ``delta`` is the δ the site reports against; it does not enter the
    composition (ε is always computed for the δ asked for).

    ``group_size`` is how many add/remove steps apart the mechanism's inputs can be when the
    site's data differs in one example (the accountant's adjacency): 1 for a release over the
    site's own examples, 2 for DP-SGD over a task plus a keyed bottom-k replay buffer (one
    example moves at most one buffer slot, i.e. one record out of the training set and one in;
    ``fedcl.client.continual_site.training_set``). The ledger composes a release of group size
    ``k`` with RDP group privacy (:func:`fedcl.privacy.ledger.compose.group_rdp`).

    ``cells`` are the data cells whose records the release reads (:mod:`.cells`: the site's ε
    is the max over cells of the composition of the releases touching each); the default, the
    universal cell, composes with everything (sequential composition).
    """

    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    group_size: int = 1
    cells: tuple[str, ...] = UNIVERSAL_CELLS

    def __post_init__(self) -> None:
        problems = _release_problems(
            self.mechanism, self.sample_rate, self.noise_multiplier, self.steps, self.delta
        ) + _group_problems(self.group_size)
        problems += cell_problems(self.cells)
        if problems:
            raise LedgerError(f"invalid privacy release {self!r}: {'; '.join(problems)}")
        object.__setattr__(self, "cells", normalise_cells(self.cells))

    @classmethod
    def of(cls, release: Any, delta: float, cells: tuple[str, ...] | None = None) -> DPRelease:
        """Adopt another feature's release record (e.g. ``continual.fisher.FisherRelease``).

        Anything with ``mechanism``, ``sample_rate``, ``noise_multiplier`` and ``steps``
        describes a (subsampled) Gaussian mechanism the ledger can compose; ``cells`` (else
        the record's own, else universal) are the data cells it reads.
        """
        if cells is None:
            cells = getattr(release, "cells", UNIVERSAL_CELLS)
        return cls(
            mechanism=release.mechanism,
            sample_rate=release.sample_rate,
            noise_multiplier=release.noise_multiplier,
            steps=release.steps,
            delta=delta,
            group_size=getattr(release, "group_size", 1),
            cells=cells,
        )

    @property
    def history(self) -> tuple[float, float, int] | tuple[float, float, int, int]:
        """The release in Opacus' accountant history format ``(σ, q, steps)``.

        A release of group size ``k > 1`` is ``(σ, q, steps, k)``, which only
        :func:`~fedcl.privacy.ledger.compose_epsilon` understands (Opacus' own accountant
        would compose it at group size 1).
        """
        if self.group_size != 1:
            return (self.noise_multiplier, self.sample_rate, self.steps, self.group_size)
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class LedgerEntry:
    """A release the site made, where and when: one line of the ledger file."""

    run_id: str
    task_index: int
    server_round: int
    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float
    timestamp: str
    version: int = SCHEMA_VERSION
    group_size: int = 1
    #: The data cells the release read (:mod:`.cells`); a line without them: universal.
    cells: tuple[str, ...] = UNIVERSAL_CELLS

    @property
    def release(self) -> DPRelease:
        return DPRelease(
            self.mechanism,
            self.sample_rate,
            self.noise_multiplier,
            self.steps,
            self.delta,
            self.group_size,
            self.cells,
        )


@dataclass(frozen=True)
class TaskSpend:
    """What one task of one run cost (ε of its releases alone)."""

    run_id: str
    task_index: int
    releases: int
    steps: int
    epsilon: float


@dataclass(frozen=True)
class RunSpend:
    """What one run cost: ε of the run's releases alone, and per task."""

    run_id: str
    releases: int
    steps: int
    epsilon: float
    first: str
    last: str
    tasks: list[TaskSpend] = field(default_factory=list)
    #: The data cell where the run's ε is reached (``"*"``: composed sequentially).
    cell: str = UNIVERSAL


@dataclass(frozen=True)
class LedgerSummary:
    """Per-run and lifetime spend of a site at one δ, with the budget left if one is given."""

    path: str
    delta: float
    accountant: str
    releases: int
    steps: int
    epsilon_lifetime: float
    budget: float | None
    runs: list[RunSpend]
    #: The data cell (of the last run) where the lifetime ε is reached (``"*"``: sequential).
    cell: str = UNIVERSAL

    @property
    def remaining(self) -> float | None:
        """Budget minus lifetime ε (never below 0), or None without a budget."""
        if self.budget is None:
            return None
        return max(self.budget - self.epsilon_lifetime, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: an infinite ε (a noiseless release) becomes the string ``"inf"``."""
        data = asdict(self)
        data["remaining"] = self.remaining
        return _json_safe(data)


@dataclass(frozen=True)
class SpendDecision:
    """Outcome of :meth:`PrivacyLedger.try_spend`: recorded or refused, and the ε around it."""

    accepted: bool
    epsilon_before: float
    epsilon_after: float
    budget: float | None


def _release_problems(
    mechanism: Any, sample_rate: Any, noise_multiplier: Any, steps: Any, delta: Any
) -> list[str]:
    problems = []
    if not isinstance(mechanism, str) or not mechanism:
        problems.append(f"mechanism must be a non-empty string, got {mechanism!r}")
    if not _is_number(sample_rate) or not 0.0 < sample_rate <= 1.0:
        problems.append(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not _is_number(noise_multiplier) or not 0.0 <= noise_multiplier < math.inf:
        problems.append(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        problems.append(f"steps must be an int >= 0, got {steps!r}")
    if not _is_number(delta) or not 0.0 < delta < 1.0:
        problems.append(f"delta must be in (0, 1), got {delta!r}")
    return problems


def cell_problems(cells: object) -> list[str]:
    """Why ``cells`` is not a valid list of cell names (an empty list: it is)."""
    if not isinstance(cells, list | tuple) or not cells:
        return [f"cells must be a non-empty list of cell names, got {cells!r}"]
    bad = [c for c in cells if not isinstance(c, str) or not c]
    return [f"cells must be non-empty strings, got {bad!r}"] if bad else []


def normalise_cells(cells: Any) -> tuple[str, ...]:
    """Sorted, unique cell names; the universal cell absorbs any other (it composes with all)."""
    problems = cell_problems(cells)
    if problems:
        raise LedgerError("; ".join(problems))
    out = tuple(sorted(set(cells)))
    return UNIVERSAL_CELLS if UNIVERSAL in out else out


def _group_problems(group_size: Any) -> list[str]:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        return [f"group_size must be an int >= 1, got {group_size!r}"]
    if group_size > MAX_GROUP_SIZE:
        return [f"group_size must be at most {MAX_GROUP_SIZE}, got {group_size!r}"]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
