"""What the hash-chained audit log costs: appending events, and verifying the whole log.

    python benchmarks/audit_chain.py [--db URL ...] [--single 500] [--bulk 20000] [--out FILE]

For each registry URL (default: a fresh SQLite file; add a PostgreSQL URL to compare; the
database should be empty, its audit log is filled): ``--single`` events each in its own
transaction (``Registry.audit``, how the dashboard and most coordinator calls write), then
``--bulk`` events in one transaction (how a batched round writes), then ``Registry.verify_audit``
over everything (what ``fedcl audit verify`` does). Prints a table and writes
``benchmarks/results/audit_chain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedcl.server.registry import Registry, default_sqlite_url
from fedcl.server.registry.audit import add_audit

RESULTS = Path(__file__).resolve().parent / "results" / "audit_chain.json"


def measure(url: str, single: int, bulk: int) -> dict[str, float | int | str | bool]:
    """Append ``single`` + ``bulk`` events to the registry at ``url`` and verify the log."""
    with Registry.open(url) as reg:
        started = time.perf_counter()
        for i in range(single):
            reg.audit("bench.event", f"event {i}", run_id="bench", site_id="site-1")
        single_s = time.perf_counter() - started
        started = time.perf_counter()
        with reg._tx() as session:  # one transaction, as the coordinator's round batch
            for i in range(bulk):
                add_audit(session, "bench.bulk", f"bulk event {i}", run_id="bench")
        bulk_s = time.perf_counter() - started
        started = time.perf_counter()
        report = reg.verify_audit()
        verify_s = time.perf_counter() - started
        shown = reg.url
    return {
        "registry": shown,
        "single_ms_per_event": 1000 * single_s / max(single, 1),
        "bulk_ms_per_event": 1000 * bulk_s / max(bulk, 1),
        "verified_events": report.events,
        "verify_s": verify_s,
        "verify_events_per_s": report.events / verify_s if verify_s else 0.0,
        "intact": report.ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", action="append", help="registry URL (repeatable)")
    parser.add_argument("--single", type=int, default=500)
    parser.add_argument("--bulk", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = args.db or [default_sqlite_url(Path(tmp) / "registry.db")]
        rows = [measure(url, args.single, args.bulk) for url in urls]
    table = Table(title="Audit chain: append and verify")
    for column in ("registry", "own tx ms/event", "one tx ms/event", "verify", "events/s"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            "sqlite (temp file)" if str(r["registry"]).startswith("sqlite") else str(r["registry"]),
            f"{r['single_ms_per_event']:.2f}",
            f"{r['bulk_ms_per_event']:.3f}",
            f"{r['verified_events']} in {r['verify_s']:.2f} s",
            f"{r['verify_events_per_s']:.0f}",
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "single": args.single,
        "bulk": args.bulk,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "rows": [{**r, "registry": str(r["registry"]).split("@")[-1]} for r in rows],
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
