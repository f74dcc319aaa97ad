"""The ledger file: append-only JSON lines, atomic replace, one writer at a time.

A write copies the old content plus the new line to a temporary file, fsyncs it and renames it
over the ledger (then fsyncs the directory), so a crash at any moment leaves either the old or
the new file, never a torn line; an exclusive lock on ``privacy_ledger.lock`` serialises writers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from .cells import CellSpend, cell_spend, entry_items, release_item
from .compose import summarise
from .records import (
    GROUP_SCHEMA_VERSION,
    SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    UNIVERSAL_CELLS,
    DPRelease,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    SpendDecision,
    _group_problems,
    _release_problems,
    cell_problems,
    normalise_cells,
)

try:  # POSIX sites; on other systems writes are still atomic, only not serialised
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LEDGER_FILE = "privacy_ledger.jsonl"
LOCK_FILE = "privacy_ledger.lock"


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
        optional = {"version", "group_size", "cells"}  # lines before group sizes have neither
        if raw.get("version") == GROUP_SCHEMA_VERSION:
            optional = {"version", "cells"}  # a line without cells is universal
        missing = [
            k for k in LedgerEntry.__dataclass_fields__ if k not in raw and k not in optional
        ]
        if missing:
            raise LedgerError(f"corrupt privacy ledger {where}: missing {', '.join(missing)}")
        problems = _release_problems(
            raw["mechanism"],
            raw["sample_rate"],
            raw["noise_multiplier"],
            raw["steps"],
            raw["delta"],
        ) + _group_problems(raw.get("group_size", 1))
        if "cells" in raw:
            problems += cell_problems(raw["cells"])
        for key in ("task_index", "server_round"):
            if isinstance(raw[key], bool) or not isinstance(raw[key], int):
                problems.append(f"{key} must be an int, got {raw[key]!r}")
        if not isinstance(raw["run_id"], str) or not isinstance(raw["timestamp"], str):
            problems.append("run_id and timestamp must be strings")
        if raw.get("version", SCHEMA_VERSION) not in SCHEMA_VERSIONS:
            problems.append(
                f"schema version {raw.get('version')!r} is not one of {SCHEMA_VERSIONS} "
                "(written by a newer fedcl?)"
            )
        if problems:
            raise LedgerError(f"corrupt privacy ledger {where}: {'; '.join(problems)}")
        known = {k: raw[k] for k in LedgerEntry.__dataclass_fields__ if k in raw}
        known["sample_rate"] = float(known["sample_rate"])
        known["noise_multiplier"] = float(known["noise_multiplier"])
        known["delta"] = float(known["delta"])
        known["cells"] = normalise_cells(raw.get("cells", UNIVERSAL_CELLS))
        return LedgerEntry(**known)

    def history(self, *, run_id: str | None = None) -> list[tuple[float, float, int]]:
        """The releases in Opacus' accountant history format ``[(σ, q, steps), ...]``."""
        return [e.release.history for e in self.entries(run_id=run_id)]

    def epsilon(self, delta: float, *, run_id: str | None = None, accountant: str = "rdp") -> float:
        """ε(δ) of the whole history (lifetime), or of one run's releases alone.

        The max over data cells of the composition of the releases touching each
        (:mod:`.cells`); with only universal releases, the sequential ε of the history.
        """
        return self.spend(delta, run_id=run_id, accountant=accountant).epsilon

    def spend(
        self, delta: float, *, run_id: str | None = None, accountant: str = "rdp"
    ) -> CellSpend:
        """:meth:`epsilon` and the data cell where it is reached."""
        return cell_spend(entry_items(self.entries(run_id=run_id)), delta, accountant)

    def would_exceed(
        self,
        release: DPRelease,
        budget: float,
        delta: float,
        *,
        accountant: str = "rdp",
        run_id: str | None = None,
    ) -> tuple[bool, float]:
        """(exceeds, lifetime ε after) if ``release`` were added to the history now.

        Called *before* training with the planned release: the site refuses the round rather
        than spend beyond its budget. Without ``run_id`` the release counts as a run of its own
        (composed with the worst cell of every other run: never less than within a run).
        """
        items = [*entry_items(self.entries()), release_item(release, run_id or "\0new run")]
        after = cell_spend(items, delta, accountant).epsilon
        return after > budget, after

    def summary(
        self, delta: float, *, budget: float | None = None, accountant: str = "rdp"
    ) -> LedgerSummary:
        """Per run (and per task inside it): releases, steps, ε alone; plus lifetime ε."""
        return summarise(
            self.entries(), delta, budget=budget, accountant=accountant, path=str(self.path)
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
            items = entry_items(self.entries())
            before = cell_spend(items, release.delta, accountant).epsilon
            items.append(release_item(release, run_id))
            after = cell_spend(items, release.delta, accountant).epsilon
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
            version=SCHEMA_VERSION if release.group_size == 1 else GROUP_SCHEMA_VERSION,
            group_size=int(release.group_size),
            cells=release.cells,
        )
        fields = asdict(entry)
        if entry.group_size == 1:  # the line exactly as before group sizes
            del fields["group_size"]
        if entry.cells == UNIVERSAL_CELLS:  # ... and before cells (a reader without them
            del fields["cells"]  # composes every line sequentially: never less ε)
        else:
            fields["cells"] = list(entry.cells)
        line = json.dumps(fields, sort_keys=True, allow_nan=False) + "\n"
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
