"""DP-SGD memory: peak RSS of one site's training step, whole draws vs physical batches.

Large expected batches are what make DP-SGD work (De et al. 2022), and Opacus' hooks and
ExpandedWeights modes hold a per-example gradient for every parameter of every example of a
draw: ResNet-18-GN at expected batch 128 needs gigabytes. ``site.toml``'s
``max_physical_batch`` (``DPHook(max_physical_batch=M)``, Opacus' ``BatchSplittingSampler``)
puts a draw through the model in passes of at most M examples that add up to the same noisy
step (``tests/test_dp_physical_batches.py``). This measures what that buys and costs: each
setting runs in a fresh interpreter (peak RSS is per process), ``LocalTrainer.fit`` end to end.

    python benchmarks/dp_memory.py                      # resnet18-gn and cnn, hooks, b=128
    python benchmarks/dp_memory.py --models cnn --physical 0 16 --quick

Prints a table and writes ``benchmarks/results/dp_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "dp_memory.json"


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """One fit in this process: peak RSS before and after, samples per second."""
    import logging
    import warnings

    import torch
    from torch.utils.data import TensorDataset

    from fedcl.client.trainer import LocalTrainer
    from fedcl.config.experiment import TrainSpec
    from fedcl.models import build_model, count_parameters
    from fedcl.privacy import DPHook

    torch.set_num_threads(spec["threads"])
    logging.getLogger("opacus").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    gen = torch.Generator().manual_seed(0)
    n, size = spec["n"], spec["image_size"]
    data = TensorDataset(
        torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    )
    torch.manual_seed(0)
    model = build_model(spec["model"], in_channels=3, image_size=size, num_classes=10)
    physical = spec["physical"] or None
    hook = DPHook(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        grad_sample_mode=spec["mode"],
        noise_seed=0,
        max_physical_batch=physical,
    )
    train = TrainSpec(batch_size=spec["batch"], local_epochs=1, lr=0.1, momentum=0.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = LocalTrainer(train).fit(model, data, hooks=[hook])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **spec,
        "parameters": count_parameters(model),
        "steps": result.steps,
        "draws": hook.draws,
        "seconds": seconds,
        "samples_per_s": n / seconds,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "training_mb": peak - before,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["resnet18-gn", "cnn"])
    parser.add_argument("--mode", default="hooks", help="grad-sample mode (hooks, ew, ...)")
    parser.add_argument("--batch", type=int, default=128, help="expected batch (Poisson)")
    parser.add_argument("--physical", type=int, nargs="+", default=[0, 32, 8], help="0: whole")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 draws instead of 4")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(json.loads(args.worker))))
        return 0

    from rich.console import Console
    from rich.table import Table

    draws = 2 if args.quick else 4
    rows = []
    for model in args.models:
        for physical in args.physical:
            spec = {
                "model": model,
                "mode": args.mode,
                "batch": args.batch,
                "n": args.batch * draws,
                "physical": physical,
                "image_size": args.image_size,
                "threads": args.threads,
            }
            rows.append(run(spec))
    table = Table(title=f"DP-SGD memory, {args.mode} mode, expected batch {args.batch}")
    for col in ("model", "physical batch", "draws", "training MB", "peak RSS MB", "samples/s"):
        table.add_column(col, justify="right")
    base: dict[str, dict] = {}
    for r in rows:
        ref = base.setdefault(r["model"], r)
        table.add_row(
            r["model"],
            str(r["physical"] or "whole draw"),
            str(r["draws"]),
            f"{r['training_mb']:.0f} ({r['training_mb'] / max(ref['training_mb'], 1):.2f}x)",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['samples_per_s']:.1f} ({r['samples_per_s'] / ref['samples_per_s']:.2f}x)",
        )
    Console().print(table)
    doc = {
        "command": "python benchmarks/dp_memory.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
