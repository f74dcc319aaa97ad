"""The site's privacy ledger: every release of information about the site's data, forever.

A site's privacy loss accumulates over *all* runs and tasks it ever takes part in, so the
ledger lives in the site state directory (docs/DESIGN.md §6), not in Flower's per-run
``context.state``. It stores the raw mechanism parameters of each release — noise multiplier,
sample rate and step count of a (Poisson-subsampled) Gaussian mechanism — and never a per-round
ε: ε values do not add up (summing them overstates the loss by an order of magnitude, and a
fresh Opacus engine per round reports only its own round, flwr#2216). ε is recomputed from the
whole history with Opacus' accountant whenever it is asked for, so the site's answer is the
tight composition of everything it has released.

The file ``privacy_ledger.jsonl`` is append-only JSON lines. A write copies the old content plus
the new line to a temporary file, fsyncs it and renames it over the ledger (then fsyncs the
directory), so a crash at any moment leaves either the old or the new file, never a torn line;
an exclusive lock on ``privacy_ledger.lock`` serialises writers (two runs at one site).
A line that does not parse (hand edits, disk damage) is a :class:`LedgerError` naming the file
and line: the site must not train on a ledger it cannot read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fedcl.config.errors import FedclError

try:  # POSIX sites; on other systems writes are still atomic, only not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LEDGER_FILE = "privacy_ledger.jsonl"
LOCK_FILE = "privacy_ledger.lock"
SCHEMA_VERSION = 1
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
    """

    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    delta: float

    def __post_init__(self) -> None:
        problems = _release_problems(
            self.mechanism, self.sample_rate, self.noise_multiplier, self.steps, self.delta
        )
        if problems:
            raise LedgerError(f"invalid privacy release {self!r}: {'; '.join(problems)}")

    @classmethod
    def of(cls, release: Any, delta: float) -> DPRelease:
        """Adopt another feature's release record (e.g. ``continual.fisher.FisherRelease``).

        Anything with ``mechanism``, ``sample_rate``, ``noise_multiplier`` and ``steps``
        describes a (subsampled) Gaussian mechanism the ledger can compose.
        """
        return cls(
            mechanism=release.mechanism,
            sample_rate=release.sample_rate,
            noise_multiplier=release.noise_multiplier,
            steps=release.steps,
            delta=delta,
        )

    @property
    def history(self) -> tuple[float, float, int]:
        """The release in Opacus' accountant history format ``(σ, q, steps)``."""
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

    @property
    def release(self) -> DPRelease:
        return DPRelease(
            self.mechanism, self.sample_rate, self.noise_multiplier, self.steps, self.delta
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


def compose_epsilon(
    history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε(δ) of a sequence of ``(noise_multiplier, sample_rate, steps)`` releases.

    The history is handed to Opacus' own accountant in its own history format, so the ledger
    reports exactly what Opacus would after taking those steps. Composition is commutative, so
    releases with equal (σ, q) are merged first (fewer terms; exact for RDP, and PRV's cost
    grows with the number of distinct mechanisms). A release with σ = 0 gives ε = inf.
    """
    if not 0.0 < delta < 1.0:
        raise LedgerError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise LedgerError(f"unknown accountant {accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0
    if any(sigma == 0.0 for sigma, _ in merged):
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as err:
        # PRV's numerical domain does not cover every (σ, q, steps); RDP always applies.
        raise LedgerError(
            f"the {accountant} accountant cannot compose this history ({err}); use accountant='rdp'"
        ) from err


class PrivacyLedger:
    """Append-only record of a site's privacy releases in ``state_dir/privacy_ledger.jsonl``.

    Cheap to construct (nothing is read until asked), so a site opens a new one per message;
    every query rereads the file, which keeps separate processes (one per Flower message in a
    deployment) consistent without caching rules.
    """

    def __init__(self, state_dir: Path | str):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.lock_path = self.state_dir / LOCK_FILE

    # ------------------------------------------------------------------ reading

    def entries(self, *, run_id: str | None = None) -> list[LedgerEntry]:
        """All entries, oldest first (only ``run_id``'s when given)."""
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise LedgerError(f"site state dir {self.state_dir} is not a directory")
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"cannot read privacy ledger {self.path}: {err}") from err
        out = [
            self._parse(line, number)
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
        return [e for e in out if run_id is None or e.run_id == run_id]

    def _parse(self, line: str, number: int) -> LedgerEntry:
        where = f"{self.path}, line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise LedgerError(f"corrupt privacy ledger {where}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise LedgerError(f"corrupt privacy ledger {where}: expected a JSON object")
        missing = [k for k in LedgerEntry.__dataclass_fields__ if k not in raw and k != "version"]
        if missing:
            raise LedgerError(f"corrupt privacy ledger {where}: missing {', '.join(missing)}")
        problems = _release_problems(
            raw["mechanism"],
            raw["sample_rate"],
            raw["noise_multiplier"],
            raw["steps"],
            raw["delta"],
        )
        for key in ("task_index", "server_round"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                problems.append(f"{key} must be an int, got {raw[key]!r}")
        if not isinstance(raw["run_id"], str) or not isinstance(raw["timestamp"], str):
            problems.append("run_id and timestamp must be strings")
        if raw.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
            problems.append(
                f"schema version {raw.get('version')!r} is not {SCHEMA_VERSION} "
                "(written by a newer fedcl?)"
            )
        if problems:
            raise LedgerError(f"corrupt privacy ledger {where}: {'; '.join(problems)}")
        known = {k: raw[k] for k in LedgerEntry.__dataclass_fields__ if k in raw}
        known["sample_rate"] = float(known["sample_rate"])
        known["noise_multiplier"] = float(known["noise_multiplier"])
        known["delta"] = float(known["delta"])
        return LedgerEntry(**known)

    def history(self, *, run_id: str | None = None) -> list[tuple[float, float, int]]:
        """The releases in Opacus' accountant history format ``[(σ, q, steps), ...]``."""
        return [e.release.history for e in self.entries(run_id=run_id)]

    def epsilon(self, delta: float, *, run_id: str | None = None, accountant: str = "rdp") -> float:
        """ε(δ) of the whole history (lifetime), or of one run's releases alone."""
        return compose_epsilon(self.history(run_id=run_id), delta, accountant)

    def would_exceed(
        self, release: DPRelease, budget: float, delta: float, *, accountant: str = "rdp"
    ) -> tuple[bool, float]:
        """(exceeds, lifetime ε after) if ``release`` were added to the history now.

        Called *before* training with the planned release: the site refuses the round rather
        than spend beyond its budget.
        """
        after = compose_epsilon([*self.history(), release.history], delta, accountant)
        return after > budget, after

    def summary(
        self, delta: float, *, budget: float | None = None, accountant: str = "rdp"
    ) -> LedgerSummary:
        """Per run (and per task inside it): releases, steps, ε alone; plus lifetime ε."""
        entries = self.entries()
        runs: list[RunSpend] = []
        for run_id in dict.fromkeys(e.run_id for e in entries):
            mine = [e for e in entries if e.run_id == run_id]
            tasks = []
            for task in sorted({e.task_index for e in mine}):
                of_task = [e for e in mine if e.task_index == task]
                tasks.append(
                    TaskSpend(
                        run_id=run_id,
                        task_index=task,
                        releases=len(of_task),
                        steps=sum(e.steps for e in of_task),
                        epsilon=compose_epsilon(
                            [e.release.history for e in of_task], delta, accountant
                        ),
                    )
                )
            runs.append(
                RunSpend(
                    run_id=run_id,
                    releases=len(mine),
                    steps=sum(e.steps for e in mine),
                    epsilon=compose_epsilon([e.release.history for e in mine], delta, accountant),
                    first=mine[0].timestamp,
                    last=mine[-1].timestamp,
                    tasks=tasks,
                )
            )
        return LedgerSummary(
            path=str(self.path),
            delta=delta,
            accountant=accountant,
            releases=len(entries),
            steps=sum(e.steps for e in entries),
            epsilon_lifetime=compose_epsilon(
                [e.release.history for e in entries], delta, accountant
            ),
            budget=budget,
            runs=runs,
        )

    # ------------------------------------------------------------------ writing

    def record(
        self, release: DPRelease, *, run_id: str, task_index: int, server_round: int
    ) -> LedgerEntry:
        """Append ``release`` durably (fsync'd, atomic replace) and return its entry."""
        with self._locked():
            return self._append(release, run_id, task_index, server_round)

    def try_spend(
        self,
        release: DPRelease,
        *,
        budget: float | None,
        run_id: str,
        task_index: int,
        server_round: int,
        accountant: str = "rdp",
    ) -> SpendDecision:
        """Check the budget and record ``release`` in one step under the ledger lock.

        This is the race-free form of ``would_exceed`` + ``record``: two processes of one
        site (two concurrent runs) cannot both pass the check and together overspend. Charging
        the planned release *before* training is conservative: a training that then fails
        has paid for nothing, but nothing can leave the site unpaid.
        """
        with self._locked():
            history = self.history()
            before = compose_epsilon(history, release.delta, accountant)
            after = compose_epsilon([*history, release.history], release.delta, accountant)
            if budget is not None and after > budget:
                return SpendDecision(False, before, after, budget)
            self._append(release, run_id, task_index, server_round)
            return SpendDecision(True, before, after, budget)

    def _append(
        self, release: DPRelease, run_id: str, task_index: int, server_round: int
    ) -> LedgerEntry:
        if not isinstance(run_id, str) or not run_id:
            raise LedgerError(f"run_id must be a non-empty string, got {run_id!r}")
        entry = LedgerEntry(
            run_id=run_id,
            task_index=int(task_index),
            server_round=int(server_round),
            mechanism=release.mechanism,
            sample_rate=float(release.sample_rate),
            noise_multiplier=float(release.noise_multiplier),
            steps=int(release.steps),
            delta=float(release.delta),
            timestamp=datetime.now(UTC).isoformat(timespec="microseconds"),
        )
        line = json.dumps(asdict(entry), sort_keys=True, allow_nan=False) + "\n"
        self.entries()  # refuse to append to a ledger that does not parse
        try:
            old = self.path.read_bytes()
        except FileNotFoundError:
            old = b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self._replace(old + line.encode("utf-8"))
        return entry

    def _replace(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=LEDGER_FILE + ".", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.state_dir)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.lock_path, "a+b")  # noqa: SIM115 - held across the yield
        except OSError as err:
            raise LedgerError(f"cannot write privacy ledger in {self.state_dir}: {err}") from err
        with fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
