"""One benchmark suite (issue 14): fedcl against plain Flower, scale, HE bytes on real rounds.

    python benchmarks/suite.py [--quick] [--only flower,scale,he] [--repeats 2] [--out DIR]
                               [--he-seeds 0,1,2] [--no-he-many]

* **flower**: fedcl (``digits-domain-il``: 5 tasks, MLP) against a plain Flower 1.41 FedAvg app
  (``FedAvg.start``: a train and an evaluate round trip per round, as Flower's examples do) on
  the same site shards, model, local epochs, batch size and learning rate, both on the
  in-process Grid (``fedcl.simulations.local_grid``: no Ray, no network, so the difference is
  the frameworks' own). Paired: the two alternate, ``--repeats`` pairs at 5 and 20 sites.
  *Whole process* is one run end to end (site configs, every round, the last evaluation,
  results.json; for Flower, the strategy's result); *s/round* the median time between one
  round's train messages and the next after the first two rounds (steady state); *per-site
  cost* the slope of s/round between 5 and 20 sites.
* **scale**: fedcl on ``digits-many-sites`` (class-IL, 5 tasks, the MLP, about 5 images a
  site) with 5, 100 and 1,000 sites, at most 100 sampled per round: s/round and the worker
  process's peak RSS.
* **he**: the default scenario with HE on and off, paired (round time ratio), and the ``he``
  block of its results.json (bytes per parameter up and down measured on the real rounds,
  encrypt / aggregate / decrypt seconds per round); then HE with 100 sites per round and the
  default packing (he.max_sites and he.values_per_slot unset). ``--he-seeds 0,1,2`` makes the
  pairs one per experiment seed (alternating which runs first), ``--no-he-many`` skips the
  100-site run.

Every measurement runs in its own worker process (``--worker``), with torch's thread count set
explicitly (1: on a shared box more threads than free cores only slow torch down), so memory is
per run and nothing is cached across runs. Writes ``suite.json``, ``suite.md`` and plots under
``benchmarks/results/`` (or ``--out``). The figures are for the notes; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1


# --- workers (one run each, in a fresh process) ---------------------------------------------
class TimingGrid:
    """A Grid around the in-process one that notes when each round's train messages leave."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.train_sent: list[float] = []
        self.train_cpu: list[float] = []  # this process's CPU seconds at the same moments

    def _mark(self, messages: list) -> None:
        if messages and messages[0].metadata.message_type == "train":
            self.train_sent.append(time.perf_counter())
            self.train_cpu.append(time.process_time())

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self._mark(messages)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def push_messages(self, messages):  # in case a strategy pushes and pulls itself
        messages = list(messages)
        self._mark(messages)
        return self._grid.push_messages(messages)


def _round_times(sent: list[float], end: float) -> list[float]:
    marks = [*sent, end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def work_fedcl(spec: dict) -> dict:
    """One fedcl run in-process: site configs, the coordinator, results.json."""
    import torch

    torch.set_num_threads(THREADS)
    from fedcl.client.app import app as client_app
    from fedcl.server.coordinator import Coordinator, CoordinatorOptions
    from fedcl.server.registry import Registry
    from fedcl.server.results import build_results
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.local_grid import LocalGrid
    from fedcl.simulations.runner import fit_weight_unit, prepare_keys, write_site_configs

    out = Path(spec["out"])
    _, exp = load_scenario(spec["scenario"], spec["overrides"])
    start, cpu0 = time.perf_counter(), time.process_time()
    exp = prepare_keys(exp, out)
    exp = fit_weight_unit(exp, write_site_configs(exp, out / "sites"))  # as `fedcl simulate`
    options = CoordinatorOptions(
        experiment=exp,
        registry_url=f"sqlite:///{out / 'registry.db'}",
        run_id="bench",
        scenario=spec["scenario"],
        sites_dir=str((out / "sites").resolve()),
    )
    grid = TimingGrid(LocalGrid(client_app, exp.simulation.num_sites))
    setup = time.perf_counter() - start
    status = Coordinator(grid, options).run()
    end, cpu_end = time.perf_counter(), time.process_time()
    with Registry.open(options.registry_url) as reg:
        results = build_results(reg, "bench", wall_seconds=end - start)
    (out / "results.json").write_text(json.dumps(results))
    wall = time.perf_counter() - start
    return {
        "status": status,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "setup_s": setup,
        "round_s": _round_times(grid.train_sent, end),
        "round_cpu_s": _round_times(grid.train_cpu, cpu_end),
        "sites": exp.simulation.num_sites,
        "sites_per_round": exp.round_sites,
        "avg_accuracy": results["avg_accuracy"],
        "he": results["he"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def work_flower(spec: dict) -> dict:
    """A plain Flower 1.41 FedAvg app on the same shards, model and hyper-parameters."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    torch.set_num_threads(THREADS)
    from fedcl.client.site import load_site_data, resolve_site_config
    from fedcl.continual.plan import RunPlan
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.local_grid import LocalGrid
    from fedcl.simulations.runner import write_site_configs

    out = Path(spec["out"])
    _, exp = load_scenario(spec["scenario"], spec["overrides"])
    start, cpu0 = time.perf_counter(), time.process_time()
    write_site_configs(exp, out / "sites")
    plan = RunPlan.of(exp)
    train = exp.train
    rounds_per_task = train.rounds_per_task
    sites_dir = str(out / "sites")
    app = ClientApp()

    def site_data(context: Context):
        site = resolve_site_config(dict(context.node_config), sites_dir)
        return load_site_data(exp, site)

    @app.train()
    def fit(msg: Message, context: Context) -> Message:
        data = site_data(context)
        task = (int(msg.content["config"]["server-round"]) - 1) // rounds_per_task
        model = plan.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        dataset = data.train_set(task)
        loader = torch.utils.data.DataLoader(dataset, batch_size=train.batch_size, shuffle=True)
        opt = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)
        for _ in range(train.local_epochs):
            for x, y in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(dataset)}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def score(msg: Message, context: Context) -> Message:
        data = site_data(context)
        model = plan.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for j in range(len(data.stream.evaluation_tasks)):
                x, y = data.test_set(j).tensors
                if len(y):
                    correct += int((model(x).argmax(1) == y).sum())
                    count += len(y)
        metrics = MetricRecord({"num-examples": count, "accuracy": correct / max(count, 1)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    n = exp.simulation.num_sites
    grid = TimingGrid(LocalGrid(app, n))
    strategy = FedAvg(
        fraction_train=exp.strategy.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=exp.round_sites,
        min_evaluate_nodes=n,
        min_available_nodes=n,
    )
    setup = time.perf_counter() - start
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(plan.initial_model().state_dict()),
        num_rounds=len(plan.schedule),
    )
    end, cpu_end = time.perf_counter(), time.process_time()
    accuracy = result.evaluate_metrics_clientapp.get(len(plan.schedule), {}).get("accuracy")
    return {
        "status": "completed",
        "wall_s": end - start,
        "cpu_s": cpu_end - cpu0,
        "setup_s": setup,
        "round_s": _round_times(grid.train_sent, end),
        "round_cpu_s": _round_times(grid.train_cpu, cpu_end),
        "sites": n,
        "final_accuracy": accuracy,
        "peak_rss_mb": _peak_rss_mb(),
    }


WORKERS = {"fedcl": work_fedcl, "flower": work_flower}


def run_worker(kind: str, scenario: str, overrides: list[str], timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON (and its process wall)."""
    with tempfile.TemporaryDirectory(prefix="fedcl-suite-") as tmp:
        spec = {"kind": kind, "scenario": scenario, "overrides": overrides, "out": tmp}
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "FLWR_TELEMETRY_ENABLED": "0"}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
        process_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {scenario} {overrides} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = process_s
    return result


def steady(round_s: list[float], skip: int = 2) -> float:
    """Median seconds per round after the first ``skip`` (imports, caches, first model)."""
    tail = round_s[skip:] or round_s
    return statistics.median(tail)


# --- sections -------------------------------------------------------------------------------
def bench_flower(quick: bool, repeats: int) -> dict:
    rounds = "train.rounds_per_task=2" if quick else "train.rounds_per_task=5"
    points = {}
    for sites in (5, 20):
        overrides = [rounds, f"simulation.num_sites={sites}", "train.local_epochs=1"]
        pairs = []
        for _ in range(repeats):
            fedcl = run_worker("fedcl", "digits-domain-il", overrides)
            flower = run_worker("flower", "digits-domain-il", overrides)
            pairs.append(
                {
                    "fedcl_wall_s": fedcl["wall_s"],
                    "flower_wall_s": flower["wall_s"],
                    "fedcl_cpu_s": fedcl["cpu_s"],
                    "flower_cpu_s": flower["cpu_s"],
                    "cpu_ratio": fedcl["cpu_s"] / flower["cpu_s"],
                    "fedcl_round_cpu_s": steady(fedcl["round_cpu_s"]),
                    "flower_round_cpu_s": steady(flower["round_cpu_s"]),
                    "round_cpu_ratio": steady(fedcl["round_cpu_s"]) / steady(flower["round_cpu_s"]),
                    "fedcl_process_s": fedcl["process_s"],
                    "flower_process_s": flower["process_s"],
                    "fedcl_round_s": steady(fedcl["round_s"]),
                    "flower_round_s": steady(flower["round_s"]),
                    "wall_ratio": fedcl["wall_s"] / flower["wall_s"],
                    "round_ratio": steady(fedcl["round_s"]) / steady(flower["round_s"]),
                    "fedcl_accuracy": fedcl["avg_accuracy"],
                    "flower_final_accuracy": flower["final_accuracy"],
                }
            )
        points[sites] = {
            "overrides": overrides,
            "pairs": pairs,
            **{
                key: statistics.median(p[key] for p in pairs)
                for key in pairs[0]
                if isinstance(pairs[0][key], float)
            },
        }
    lo, hi = points[5], points[20]
    per_site = {
        name: (hi[f"{name}_round_s"] - lo[f"{name}_round_s"]) / 15 for name in ("fedcl", "flower")
    }
    per_site_cpu = {
        name: (hi[f"{name}_round_cpu_s"] - lo[f"{name}_round_cpu_s"]) / 15
        for name in ("fedcl", "flower")
    }
    return {"points": points, "per_site_s": per_site, "per_site_cpu_s": per_site_cpu}


def bench_scale(quick: bool) -> dict:
    rounds = "train.rounds_per_task=1" if quick else "train.rounds_per_task=2"
    rows = []
    for sites in (5, 100, 1000):
        fraction = min(1.0, 100 / sites)
        overrides = [f"simulation.num_sites={sites}", f"strategy.fraction_train={fraction}", rounds]
        run = run_worker("fedcl", "digits-many-sites", overrides)
        rows.append(
            {
                "sites": sites,
                "sites_per_round": run["sites_per_round"],
                "round_s": steady(run["round_s"], skip=1),
                "round_cpu_s": steady(run["round_cpu_s"], skip=1),
                "rounds": len(run["round_s"]),
                "wall_s": run["wall_s"],
                "setup_s": run["setup_s"],
                "peak_rss_mb": run["peak_rss_mb"],
                "status": run["status"],
            }
        )
    return {"rows": rows}


def bench_he(
    quick: bool, repeats: int, seeds: list[int] | None = None, many_sites: bool = True
) -> dict:
    """HE on against off on the default scenario, paired; with ``seeds``, one pair per
    experiment seed (``seed=S`` on both runs, so both train on the same shards and order), the
    pair's order alternating so that drift on a shared box does not favour one side."""
    rounds = "train.rounds_per_task=2" if quick else "train.rounds_per_task=3"
    plan = [(s, [f"seed={s}"]) for s in seeds] if seeds else [(None, [])] * repeats
    pairs = []
    for i, (seed, extra) in enumerate(plan):
        base = [rounds, *extra]
        if i % 2:
            off = run_worker("fedcl", "digits-domain-il", base)
            on = run_worker("fedcl", "digits-domain-il", [*base, "he.enabled=true"])
        else:
            on = run_worker("fedcl", "digits-domain-il", [*base, "he.enabled=true"])
            off = run_worker("fedcl", "digits-domain-il", base)
        pairs.append(
            {
                "seed": seed,
                "on_round_s": steady(on["round_s"]),
                "off_round_s": steady(off["round_s"]),
                "on_round_cpu_s": steady(on["round_cpu_s"]),
                "off_round_cpu_s": steady(off["round_cpu_s"]),
                "ratio": steady(on["round_s"]) / steady(off["round_s"]),
                "cpu_ratio": steady(on["round_cpu_s"]) / steady(off["round_cpu_s"]),
                "on_accuracy": on["avg_accuracy"],
                "off_accuracy": off["avg_accuracy"],
                "he": on["he"],
            }
        )
    doc: dict[str, Any] = {
        "default_scenario": {
            "pairs": pairs,
            "round_ratio": statistics.median(p["ratio"] for p in pairs),
            "round_cpu_ratio": statistics.median(p["cpu_ratio"] for p in pairs),
            "he": pairs[-1]["he"],
        }
    }
    if not many_sites:
        return doc
    many = run_worker(
        "fedcl",
        "digits-many-sites",
        [
            "simulation.num_sites=100",
            "strategy.fraction_train=1.0",
            "data.num_tasks=1",
            "train.rounds_per_task=2" if quick else "train.rounds_per_task=3",
            "he.enabled=true",
        ],
    )
    doc["hundred_sites"] = {
        "status": many["status"],
        "sites_per_round": many["sites_per_round"],
        "round_s": steady(many["round_s"], skip=1),
        "round_cpu_s": steady(many["round_cpu_s"], skip=1),
        "he": many["he"],
    }
    return doc


# --- report ----------------------------------------------------------------------------------
def _f(value: Any, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def report(doc: dict) -> str:
    lines = [
        "# fedcl benchmark suite",
        "",
        f"`{doc['command']}` on {doc['machine']} ({doc['started']}, torch threads {THREADS}).",
        "",
    ]
    if "flower" in doc:
        fl = doc["flower"]
        lines += [
            "## fedcl vs plain Flower 1.41 FedAvg (in-process Grid, paired)",
            "",
            "Wall seconds, and in brackets this process's CPU seconds (what a shared box does "
            "not distort); ratios are fedcl / Flower, medians of the pairs.",
            "",
            "| sites | fedcl whole run | Flower whole run | ratio | fedcl s/round | "
            "Flower s/round | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for sites, p in fl["points"].items():
            lines.append(
                f"| {sites} | {_f(p['fedcl_wall_s'])} ({_f(p['fedcl_cpu_s'])}) | "
                f"{_f(p['flower_wall_s'])} ({_f(p['flower_cpu_s'])}) | "
                f"{_f(p['wall_ratio'])} ({_f(p['cpu_ratio'])}) | "
                f"{_f(p['fedcl_round_s'])} ({_f(p['fedcl_round_cpu_s'])}) | "
                f"{_f(p['flower_round_s'])} ({_f(p['flower_round_cpu_s'])}) | "
                f"{_f(p['round_ratio'])} ({_f(p['round_cpu_ratio'])}) |"
            )
        ps, pc = fl["per_site_s"], fl["per_site_cpu_s"]
        lines += [
            "",
            f"Per added site and round: fedcl {_f(ps['fedcl'] * 1000)} ms "
            f"({_f(pc['fedcl'] * 1000)} ms CPU), Flower {_f(ps['flower'] * 1000)} ms "
            f"({_f(pc['flower'] * 1000)} ms CPU): the slope between 5 and 20 sites.",
            "",
        ]
    if "scale" in doc:
        lines += [
            "## Scale (digits-many-sites, in-process, at most 100 sites a round)",
            "",
            "| sites | per round | s/round (CPU s) | peak RSS MB | whole run s |",
            "|---|---|---|---|---|",
        ]
        for r in doc["scale"]["rows"]:
            lines.append(
                f"| {r['sites']} | {r['sites_per_round']} | {_f(r['round_s'])} "
                f"({_f(r['round_cpu_s'])}) | {_f(r['peak_rss_mb'], '.0f')} | {_f(r['wall_s'])} |"
            )
        lines.append("")
    if "he" in doc:
        he = doc["he"]["default_scenario"]
        block = he["he"]
        sec = block.get("seconds_per_round", {})
        many = doc["he"].get("hundred_sites")
        lines += [
            "## HE on real rounds",
            "",
            f"Default scenario: {_f(block.get('bytes_per_param_up'))} bytes per parameter up "
            f"({_f(block.get('fp32_ratio_up'))}× fp32), {_f(block.get('bytes_per_param_down'))} "
            f"down; packing {block.get('packing')}; per round encrypt {_f(sec.get('encrypt'))} s, "
            f"aggregate {_f(sec.get('aggregate'))} s, decrypt {_f(sec.get('decrypt'))} s; round "
            f"time HE on/off {_f(he['round_ratio'])}× ({_f(he['round_cpu_ratio'])}× in CPU "
            f"time; median of {len(he['pairs'])} pairs).",
            "",
            "| seed | HE on s/round (CPU s) | HE off s/round (CPU s) | ratio (CPU) | "
            "accuracy on / off |",
            "|---|---|---|---|---|",
        ]
        for p in he["pairs"]:
            lines.append(
                f"| {p.get('seed')} | {_f(p['on_round_s'])} ({_f(p.get('on_round_cpu_s'))}) | "
                f"{_f(p['off_round_s'])} ({_f(p.get('off_round_cpu_s'))}) | {_f(p['ratio'])} "
                f"({_f(p['cpu_ratio'])}) | {_f(p.get('on_accuracy'))} / "
                f"{_f(p.get('off_accuracy'))} |"
            )
        lines.append("")
        if many:
            lines += [
                f"100 sites a round, default packing: {many['status']}, "
                f"{_f(many['round_s'])} s/round ({_f(many['round_cpu_s'])} CPU s), packing "
                f"{many['he'].get('packing')}, "
                f"{_f(many['he'].get('bytes_per_param_up'))} bytes per parameter up.",
                "",
            ]
    return "\n".join(lines)


def plot(doc: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "flower" in doc:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        points = doc["flower"]["points"]
        sites = [int(s) for s in points]
        for name in ("fedcl", "flower"):
            ax.plot(sites, [points[s][f"{name}_round_s"] for s in points], "o-", label=name)
        ax.set_xlabel("sites (all train every round)")
        ax.set_ylabel("s per round (steady state)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "suite-flower.png", dpi=120)
        written.append("suite-flower.png")
    if "scale" in doc:
        rows = doc["scale"]["rows"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["sites"] for r in rows], [r["round_s"] for r in rows], "o-", label="s/round")
        ax.set_xscale("log")
        ax.set_xlabel("virtual sites (≤ 100 sampled a round)")
        ax.set_ylabel("s per round")
        ax2 = ax.twinx()
        ax2.plot([r["sites"] for r in rows], [r["peak_rss_mb"] for r in rows], "s--", color="C1")
        ax2.set_ylabel("peak RSS (MB)")
        fig.tight_layout()
        fig.savefig(out / "suite-scale.png", dpi=120)
        written.append("suite-scale.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds per run")
    parser.add_argument("--only", default="flower,scale,he", help="comma-separated sections")
    parser.add_argument("--repeats", type=int, default=2, help="paired runs per point")
    parser.add_argument(
        "--he-seeds",
        help="he section: one paired HE on/off run per experiment seed (e.g. 0,1,2) instead of "
        "--repeats unseeded pairs",
    )
    parser.add_argument(
        "--no-he-many", action="store_true", help="he section: skip the 100-sites HE run"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    doc: dict[str, Any] = {
        "command": "python benchmarks/suite.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for section in sections:
        start = time.perf_counter()
        if section == "flower":
            doc["flower"] = bench_flower(args.quick, args.repeats)
        elif section == "scale":
            doc["scale"] = bench_scale(args.quick)
        elif section == "he":
            seeds = [int(x) for x in args.he_seeds.split(",")] if args.he_seeds else None
            doc["he"] = bench_he(args.quick, args.repeats, seeds, not args.no_he_many)
        else:
            parser.error(f"unknown section {section!r}: use flower, scale, he")
        print(f"{section}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "suite-quick" if args.quick else "suite"
    if sections != ["flower", "scale", "he"]:
        name += "-" + "-".join(sections)
    if args.he_seeds and "he" in sections:
        name += "-seeds"
    (args.out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    text = report(doc)
    (args.out / f"{name}.md").write_text(text + "\n")
    doc["plots"] = plot(doc, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
