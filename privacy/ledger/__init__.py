"""The site's privacy ledger: every release of information about the site's data, forever.

A site's privacy loss accumulates over *all* runs and tasks it ever takes part in, so the
ledger lives in the site state directory (docs/DESIGN.md §6), not in Flower's per-run
``context.state``. It stores the raw mechanism parameters of each release — noise multiplier,
sample rate and step count of a (Poisson-subsampled) Gaussian mechanism, and its group size
(2 for DP-SGD over a replay buffer, composed by RDP group privacy) — and never a per-round
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

Every release names the data cells it reads (its task's training data, the test data, or all
of it): the site's ε is the max over cells of the composition of the releases touching each
(parallel composition; :mod:`.cells` owns the rule), the sequential composition when every
release is universal (lines written before cells).

Modules: :mod:`.records` (releases, entries, summaries), :mod:`.compose` (ε of a history, and
the per-run summary), :mod:`.cells` (the max over data cells) and :mod:`.store`
(:class:`PrivacyLedger`, the file). Every name is
re-exported here.
"""

from __future__ import annotations

from .cells import CellSpend, cell_spend, entry_items, release_item
from .compose import compose_epsilon, summarise
from .records import (
    ACCOUNTANTS,
    SCHEMA_VERSION,
    UNIVERSAL,
    UNIVERSAL_CELLS,
    Accountant,
    DPRelease,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    RunSpend,
    SpendDecision,
    TaskSpend,
)
from .store import LEDGER_FILE, LOCK_FILE, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILE",
    "LOCK_FILE",
    "SCHEMA_VERSION",
    "UNIVERSAL",
    "UNIVERSAL_CELLS",
    "Accountant",
    "CellSpend",
    "DPRelease",
    "LedgerEntry",
    "LedgerError",
    "LedgerSummary",
    "PrivacyLedger",
    "RunSpend",
    "SpendDecision",
    "TaskSpend",
    "cell_spend",
    "compose_epsilon",
    "entry_items",
    "release_item",
    "summarise",
]
