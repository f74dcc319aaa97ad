"""Alerts a coordinator should act on, from a run's results document: one rule each.

The run page lists them and ``/metrics`` exports them (``fedcl_run_alert``), so the page and
Prometheus (deploy/prometheus/fedcl-alerts.yaml) never disagree about what is wrong.

* ``accuracy_drop``: the federation's mean accuracy (on the tasks both rounds measured) fell by
  more than :data:`ACCURACY_DROP` from one evaluated round to the next;
* ``budget``: a site's lifetime ε reached :data:`BUDGET_NEAR` of its budget (critical when spent);
* ``site_failing``: a site failed :data:`FAILING_ROUNDS` or more training rounds of the run.
"""

from __future__ import annotations

from typing import Any

from ..schemas import AlertOut

ACCURACY_DROP = 0.05
BUDGET_NEAR = 0.8
FAILING_ROUNDS = 3


def accuracy_drops(results: dict[str, Any]) -> list[AlertOut]:
    alerts = []
    previous: tuple[int, dict[int, float]] | None = None
    for r in results["rounds"]:
        acc = {j: a for j, a in enumerate(r.get("accuracy") or []) if a is not None}
        if r["kind"] != "train" or not acc:
            continue
        if previous is not None:
            shared = sorted(set(acc) & set(previous[1]))
            if shared:
                before = sum(previous[1][j] for j in shared) / len(shared)
                now = sum(acc[j] for j in shared) / len(shared)
                if before - now > ACCURACY_DROP:
                    alerts.append(
                        AlertOut(
                            kind="accuracy_drop",
                            severity="warning",
                            server_round=r["server_round"],
                            message=(
                                f"round {r['server_round']}: mean accuracy fell from "
                                f"{before:.1%} (round {previous[0]}) to {now:.1%}"
                            ),
                        )
                    )
        previous = (r["server_round"], acc)
    return alerts


def budget_alerts(results: dict[str, Any], may_see: Any = None) -> list[AlertOut]:
    alerts = []
    for site, s in sorted(results["sites"].items()):
        lifetime, budget = s.get("epsilon_lifetime"), s.get("budget")
        if lifetime is None or not budget or (may_see is not None and not may_see(site)):
            continue
        used = lifetime / budget
        if used >= BUDGET_NEAR:
            spent = used >= 1
            alerts.append(
                AlertOut(
                    kind="budget",
                    severity="critical" if spent else "warning",
                    site_id=site,
                    message=(
                        f"{site}: lifetime ε {lifetime:.2f} of its budget {budget:.2f} "
                        + ("(spent: it refuses to train)" if spent else f"({used:.0%} used)")
                    ),
                )
            )
    return alerts


def failing_sites(results: dict[str, Any], may_see: Any = None) -> list[AlertOut]:
    alerts = []
    for site, s in sorted(results["sites"].items()):
        failed = s.get("failed_rounds") or []
        if len(failed) < FAILING_ROUNDS or (may_see is not None and not may_see(site)):
            continue
        errors = s.get("errors") or []
        alerts.append(
            AlertOut(
                kind="site_failing",
                severity="warning",
                site_id=site,
                server_round=failed[-1],
                message=(
                    f"{site} failed {len(failed)} rounds (last: round {failed[-1]})"
                    + (f": {errors[0]}" if errors else "")
                ),
            )
        )
    return alerts


def run_alerts(results: dict[str, Any], may_see: Any = None) -> list[AlertOut]:
    """Every alert of the run; ``may_see(site)`` drops other sites' for a site token."""
    return (
        accuracy_drops(results) + budget_alerts(results, may_see) + failing_sites(results, may_see)
    )
