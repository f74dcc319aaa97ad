"""The continual benchmark's published table is generated from its JSON, not copied by hand.

``benchmarks/continual.py --table`` merges the reports of several runs (one per HE setting) into
one markdown table; the README next to the committed reports must hold exactly that table, so a
rerun that changes the JSON without the README (or the other way round) fails here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "results" / "continual-quick-seeds"


def _continual():
    spec = importlib.util.spec_from_file_location(
        "continual_bench", ROOT / "benchmarks" / "continual.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(method: str, dp: bool, accs: list[float], *, refused: int = 0, status="completed"):
    import statistics

    return {
        "scenario": "digits-domain-il",
        "method": method,
        "dp": dp,
        "epsilon_target": 8.0 if dp else None,
        "status": status,
        "completed": len(accs) if status == "completed" else len(accs) - 1,
        "runs": [{} for _ in accs],
        "avg_accuracy": {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs)},
        "bwt": {"mean": -0.1, "std": None},
        "epsilon_max": 7.97 if dp else None,
        "failed_site_rounds": 0,
        "refused_site_rounds": refused,
    }


def test_the_table_puts_the_he_settings_side_by_side_and_their_difference() -> None:
    bench = _continual()
    off = {"he": False, "rows": [_row("naive", False, [0.80, 0.82]), _row("naive", True, [0.70])]}
    on = {
        "he": True,
        "rows": [
            _row("naive", False, [0.81, 0.83]),
            _row("naive", True, [0.74], refused=3, status="failed"),
        ],
    }
    lines = bench.markdown_table([off, on]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:10:2] == [
        "no DP, HE off: ACC",
        "no DP, HE on: ACC",
        "DP ε=8, HE off: ACC",
        "DP ε=8, HE on: ACC",
    ]
    cells = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")], strict=True))
    assert cells["no DP, HE off: ACC"] == "0.810 ± 0.010"
    assert cells["DP ε=8, HE on: ACC"] == "0.740 ± 0.000 (0/1 ok)"  # a failed row says so
    assert cells["HE on − off, no DP (pts)"] == "+1.0"
    assert cells["HE on − off, DP (pts)"] == "+4.0"
    assert cells["max ε"] == "7.97" and cells["lost site-rounds (DP)"] == "3"


def test_the_published_readme_holds_the_table_of_the_published_json() -> None:
    bench = _continual()
    reports = [json.loads(p.read_text()) for p in sorted(GRID.glob("*.json"))]
    assert {r["he"] for r in reports} == {False, True}  # both HE settings are published
    assert {row["dp"] for r in reports for row in r["rows"]} == {False, True}
    assert bench.markdown_table(reports) in (GRID / "README.md").read_text()
