"""Drift detection at the sites: false alarms on stable data, and windows to detect a shift.

    python benchmarks/drift.py [--seeds 10] [--out FILE]

Two studies, each over ``--seeds`` seeds, with and without DP, through the monitor a site runs
(``fedcl.continual.drift``; a fresh no-drift bootstrap per seed and site, reused for its windows):

* **Scenario** (``digits-drift``'s data): the digits in their ``original`` and ``low-contrast``
  domains over 5 sites (IID, a partition per seed); an MLP trained centrally on the original
  digits stands in for the global model, its embeddings (input of the last layer) projected to 8
  dimensions. Every site draws 20 windows of 80 examples against a reference of 240; from window
  10 on, site-1's windows are low-contrast. Reported: the false-alarm rate per window on stable
  windows (every window of the other sites and site-1's before the change), the windows site-1
  needs to alert, and whether any other site alerts after the change.
* **Mean shift**: 8-dimensional standard normal features (already projected), a reference of 3000
  and windows of 1000; 100 stable windows per seed for the false-alarm rate, then windows whose
  mean moved by 0.25σ: on every coordinate (a change of intensity moves every feature), and, as a
  harder case, along one direction only (Mahalanobis distance 0.25).

Rows: the default (KS, the bootstrap's 99th percentile), MMD, the seeds' fixed ``KL > 0.15`` and
the fixed 5 % class-rate rule; DP rows state σ and the ε of one report and of 20 reports
(composed by the ledger's RDP accountant at δ = 1e-5). Prints a rich table and writes
``benchmarks/results/drift.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "drift.json"
DELTA = 1e-5
DP_SIGMA = {"scenario": 1.0, "shift": 2.0}
WINDOWS_TO_DETECT = 3  # the target: a drifted site alerts within 3 windows


def _epsilon(sigma: float, reports: int) -> float:
    from fedcl.continual.drift import DriftSettings, drift_release
    from fedcl.privacy.ledger import DPRelease, compose_epsilon

    release = DPRelease.of(drift_release(DriftSettings(noise_multiplier=sigma)), DELTA)
    return compose_epsilon([release.history] * reports, DELTA, "rdp")


def _detect(alerts: list[bool]) -> int | None:
    """Windows until the first alert (1 = the first drifted window), None if none."""
    return next((i + 1 for i, a in enumerate(alerts) if a), None)


# ------------------------------------------------------------------------------------- scenario
def _scenario_embeddings(seed: int):
    """(embeddings, predictions) of every original and low-contrast digit, and the domains."""
    import torch

    from fedcl.client.drift_site import embed
    from fedcl.continual.drift import project
    from fedcl.datasets.builtin import digits_domains
    from fedcl.models import build_model

    data = digits_domains(["original", "low-contrast"])
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    torch.manual_seed(seed)
    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train = np.flatnonzero(data.domain == 0)
    rng = np.random.default_rng(seed)
    for _ in range(5):  # a few epochs on the original digits: the "global model"
        for batch in np.array_split(rng.permutation(train), len(train) // 32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
    emb, pred = embed(model, x)
    return project(emb, 8, seed=seed), pred, data.domain, data.y


def scenario_study(seeds: int, settings_list: list[tuple[str, object]]) -> list[dict]:
    from fedcl.continual.drift import assess, calibrate
    from fedcl.continual.drift.calibration import keyed_order
    from fedcl.datasets import partition_indices

    sites, windows, change, n, n_ref = 5, 20, 10, 80, 240
    rows = {name: {"stable": 0, "false": 0, "detect": [], "others": 0} for name, _ in settings_list}
    for seed in range(seeds):
        z, pred, domain, y = _scenario_embeddings(seed)
        base = np.flatnonzero(domain == 0)
        shards = partition_indices(y[base], sites, scheme="iid", alpha=1.0, domain=None, seed=seed)
        for s, shard in enumerate(shards):
            pool = base[shard]
            moved = pool + len(base)  # the same images, low contrast (domain 1 follows domain 0)
            key = bytes([seed, s]) * 16
            order = keyed_order(z[pool], key, b"bench")
            ref = pool[order[:n_ref]]
            rest = pool[order[n_ref:]]
            rng = np.random.default_rng([seed, s])
            for name, settings in settings_list:
                cal = None
                if settings.calibration == "bootstrap":
                    zr = z[ref]
                    if settings.dp:
                        from fedcl.continual.drift.detectors import clip_rows

                        zr = clip_rows(zr, settings.clip_norm)
                    cal = calibrate(zr, pred[ref], n, 10, settings, key=key)
                alerts = []
                for w in range(windows):
                    src = moved if (s == 1 and w >= change) else rest
                    win = rng.choice(src if s != 1 or w < change else moved, n, replace=False)
                    report = assess(
                        z[ref], z[win], pred[ref], pred[win], 10, settings,
                        key=key, calibration=cal, generator=rng,
                    )  # fmt: skip
                    flag = report.rate_alert if name == "rate > 5 %" else report.alert
                    alerts.append(flag)
                    if s == 1 and w >= change:
                        continue
                    rows[name]["stable"] += 1
                    rows[name]["false"] += flag
                    if w >= change:
                        rows[name]["others"] += flag
                if s == 1:
                    rows[name]["detect"].append(_detect(alerts[change:]))
    return [_summary("scenario", name, settings, rows[name]) for name, settings in settings_list]


# --------------------------------------------------------------------------------------- shift
def shift_study(seeds: int, settings_list: list[tuple[str, object]]) -> list[dict]:
    from fedcl.continual.drift import assess, calibrate
    from fedcl.continual.drift.detectors import clip_rows

    n, n_ref, dim, stable_windows = 1000, 3000, 8, 100
    out = []
    for case, direction in (
        ("0.25σ, every feature", np.full(dim, 0.25)),
        ("0.25σ, one direction", np.eye(dim)[0] * 0.25),
    ):
        rows = {
            name: {"stable": 0, "false": 0, "detect": [], "others": 0} for name, _ in settings_list
        }
        for seed in range(seeds):
            rng = np.random.default_rng([seed, 7])
            ref = rng.standard_normal((n_ref, dim))
            p_ref = rng.integers(0, 10, n_ref)
            key = bytes([seed]) * 32
            for name, settings in settings_list:
                cal = None
                if settings.calibration == "bootstrap":
                    zr = clip_rows(ref, settings.clip_norm) if settings.dp else ref
                    cal = calibrate(zr, p_ref, n, 10, settings, key=key)
                if case.endswith("feature"):  # stable windows once per seed
                    for _ in range(stable_windows):
                        win, p = rng.standard_normal((n, dim)), rng.integers(0, 10, n)
                        r = assess(ref, win, p_ref, p, 10, settings, key=key, calibration=cal,
                                   generator=rng)  # fmt: skip
                        rows[name]["stable"] += 1
                        rows[name]["false"] += r.alert
                alerts = []
                for _ in range(WINDOWS_TO_DETECT * 2):
                    win = rng.standard_normal((n, dim)) + direction
                    p = rng.integers(0, 10, n)
                    r = assess(ref, win, p_ref, p, 10, settings, key=key, calibration=cal,
                               generator=rng)  # fmt: skip
                    alerts.append(r.alert)
                rows[name]["detect"].append(_detect(alerts))
        out += [_summary(f"shift: {case}", name, s, rows[name]) for name, s in settings_list]
    return out


def _summary(study: str, name: str, settings, row: dict) -> dict:
    detect = row["detect"]
    within = sum(d is not None and d <= WINDOWS_TO_DETECT for d in detect)
    sigma = settings.noise_multiplier
    return {
        "study": study,
        "rule": name,
        "dp_sigma": sigma,
        "epsilon_per_report": None if sigma is None else _epsilon(sigma, 1),
        "epsilon_20_reports": None if sigma is None else _epsilon(sigma, 20),
        "stable_windows": row["stable"],
        "false_alarm_rate": row["false"] / row["stable"] if row["stable"] else None,
        "windows_to_detect": detect,
        "detected_within_3": within,
        "seeds": len(detect),
        "median_windows_to_detect": (
            float(np.median([d for d in detect if d is not None])) if any(detect) else None
        ),
        "other_sites_alert_after_change": row["others"] if study == "scenario" else None,
    }


def _settings():
    from fedcl.continual.drift import DriftSettings

    default = DriftSettings(detector="ks", bootstrap=300, rate_change=0.05)
    return default, [
        ("KS, bootstrap p99 (default)", default),
        ("MMD, bootstrap p99", replace(default, detector="mmd")),
        ("KL > 0.15 (fixed)", replace(default, detector="kl", calibration="fixed", threshold=0.15)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    default, rules = _settings()
    scenario_rules = [
        *rules,
        ("rate > 5 %", default),
        ("KS, bootstrap p99, DP", replace(default, noise_multiplier=DP_SIGMA["scenario"])),
    ]
    shift_rules = [
        *rules,
        ("KS, bootstrap p99, DP", replace(default, noise_multiplier=DP_SIGMA["shift"])),
        ("MMD, bootstrap p99, DP", replace(default, detector="mmd", noise_multiplier=2.0)),
    ]
    rows = scenario_study(args.seeds, scenario_rules) + shift_study(args.seeds, shift_rules)
    report = {
        "benchmark": "drift",
        "seeds": args.seeds,
        "delta": DELTA,
        "targets": {"false_alarm_rate": 0.01, "windows_to_detect": WINDOWS_TO_DETECT},
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
    }
    _print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Drift at the sites, {report['seeds']} seeds (targets: ≤1 % false alarms, "
                  f"≤{WINDOWS_TO_DETECT} windows)")  # fmt: skip
    for col in ("study", "rule", "DP σ", "ε/report", "ε/20", "false alarms", "detected ≤3",
                "median windows", "others alert"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("study", "rule") else "right")

    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    for r in report["rows"]:
        table.add_row(
            r["study"],
            r["rule"],
            f(r["dp_sigma"], "{:g}"),
            f(r["epsilon_per_report"]),
            f(r["epsilon_20_reports"]),
            "–"
            if not r["stable_windows"]
            else f"{r['false_alarm_rate']:.2%} of {r['stable_windows']}",
            f"{r['detected_within_3']}/{r['seeds']}",
            f(r["median_windows_to_detect"], "{:g}"),
            f(r["other_sites_alert_after_change"], "{:d}"),
        )
    Console(width=max(Console().width, 140)).print(table)


if __name__ == "__main__":
    raise SystemExit(main())
