"""A run's downloads: results.json, its metrics as CSV and a privacy-ledger summary.

Scoped like the pages: a site token's files hold the federation's figures and its own site's
rows, never another site's.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from fedcl.server.registry import Registry, RunInfo

from ..auth import Principal
from .cache import results_of


def _scoped(results: dict[str, Any], principal: Principal) -> dict[str, Any]:
    if principal.site_id is None:
        return results
    mine = {k: v for k, v in results["sites"].items() if principal.may_see_site(k)}
    return {**results, "sites": mine}


def results_json(registry: Registry, run: RunInfo, principal: Principal) -> str:
    return json.dumps(_scoped(results_of(registry, run.id), principal), indent=2) + "\n"


def metrics_csv(registry: Registry, run_id: str, principal: Principal) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["server_round", "task_index", "site_id", "name", "value"])
    for m in registry.list_metrics(run_id):
        if principal.may_see_site(m.site_id):
            writer.writerow(
                [
                    "" if m.server_round is None else m.server_round,
                    "" if m.task_index is None else m.task_index,
                    m.site_id or "",
                    m.name,
                    "" if m.value is None else repr(m.value),
                ]
            )
    return out.getvalue()


def ledger_csv(registry: Registry, run: RunInfo, principal: Principal) -> str:
    results = _scoped(results_of(registry, run.id), principal)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "site_id", "epsilon_run", "epsilon_lifetime", "delta", "budget", "budget_used",
            "rounds_trained", "failed_rounds", "refused_rounds",
        ]
    )  # fmt: skip
    for site, s in sorted(results["sites"].items()):
        lifetime, budget = s.get("epsilon_lifetime"), s.get("budget")
        used = lifetime / budget if lifetime is not None and budget else None
        writer.writerow(
            [
                site,
                *("" if s.get(k) is None else s[k] for k in ("epsilon", "epsilon_lifetime")),
                "" if s.get("delta") is None else s["delta"],
                "" if budget is None else budget,
                "" if used is None else f"{used:.4f}",
                s["rounds_trained"],
                len(s["failed_rounds"]),
                len(s["refused_rounds"]),
            ]
        )
    return out.getvalue()
