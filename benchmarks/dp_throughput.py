"""DP-SGD throughput: samples/s of a site's real training path, non-private vs each DP-SGD mode.

Modes: Opacus' hooks, ExpandedWeights (ew), functorch and ghost clipping, and fedcl's book-keeping
(bk, ``fedcl.privacy.dp.bookkeeping``: one backward pass, conv ghost norms where cheaper).

Why one thread by default: a site trains one small model at a time, and on a shared box
OpenMP threads that outnumber free cores spin-wait on each other (measured here: an MLP step
60x and a CNN step 5x slower with 2 threads than with 1 under a load of 7 on 2 cores). Pass
``--threads 0`` on a dedicated machine to use all cores.

Why it measures ``LocalTrainer.fit`` end to end (Poisson loader, per-sample gradients,
clipping, noise, the optimizer step) instead of a bare forward/backward: that is what a site
pays per round, and it is what ``choose_grad_sample_mode`` must be fastest at. Plain and every
DP mode are timed in one process, their repeats interleaved (plain, hooks, ew, ..., plain, ...),
and the median is kept, because a shared CPU box drifts over a run: each ratio is DP/plain
from the same run.

    python benchmarks/dp_throughput.py --quick                   # every mode, few batches
    python benchmarks/dp_throughput.py --modes chosen            # only the mode each model gets
    python benchmarks/dp_throughput.py --models cnn resnet18-gn --batch-size 32

Prints a model × mode table (samples/s and the ratio to non-private) and writes
``benchmarks/results/dp_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import opacus
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset

from fedcl.client.trainer import LocalTrainer
from fedcl.config.experiment import TrainSpec
from fedcl.models import available_models, build_model, count_parameters
from fedcl.privacy import GRAD_SAMPLE_MODES, DPHook, choose_grad_sample_mode

RESULTS = Path(__file__).resolve().parent / "results" / "dp_throughput.json"
# (model, in_channels, image_size): digits-sized and CIFAR-sized inputs.
CASES: list[tuple[str, int, int]] = [
    ("mlp", 1, 8),
    ("cnn", 1, 8),
    ("mlp", 3, 32),
    ("cnn", 3, 32),
    ("scatter-cnn", 3, 32),  # its fixed features memoised after the first pass, as at a site
    ("resnet18-gn", 3, 32),
    ("vit-tiny", 3, 32),
]
HEAVY = {"resnet18-gn", "vit-tiny"}
NUM_CLASSES = 10


class CountingDataset(Dataset):
    """Random images that count how many examples a fit actually drew (Poisson batches vary)."""

    def __init__(self, n: int, channels: int, size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, channels, size, size, generator=gen)
        self.y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        self.drawn = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.drawn += 1
        return self.x[i], self.y[i]


@dataclass
class CaseResult:
    model: str
    input: str
    params: int
    batch_size: int
    plain_samples_per_s: float
    dp_samples_per_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    chosen_mode: str = "hooks"

    @property
    def ratios(self) -> dict[str, float]:
        """DP samples/s over non-private samples/s, per mode (1.0 = DP costs nothing)."""
        return {m: v / self.plain_samples_per_s for m, v in self.dp_samples_per_s.items()}

    @property
    def chosen_ratio(self) -> float | None:
        return self.ratios.get(self.chosen_mode)


def _fit_rate(
    model: torch.nn.Module, data: CountingDataset, spec: TrainSpec, device: str, mode: str | None
) -> float:
    """Samples/s of one ``fit`` (DP-SGD with ``mode`` unless it is None)."""
    hooks = []
    if mode is not None:
        hooks.append(
            DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode)
        )
    data.drawn = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    LocalTrainer(spec, device=device).fit(model, data, hooks=hooks)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return data.drawn / (time.perf_counter() - start)


def run_case(
    name: str,
    channels: int,
    size: int,
    *,
    batch_size: int,
    batches: int,
    repeats: int,
    modes: list[str],
    device: str,
) -> CaseResult:
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, image_size=size, num_classes=NUM_CLASSES)
    chosen = choose_grad_sample_mode(model)
    spec = TrainSpec(batch_size=batch_size, local_epochs=1, lr=0.01, momentum=0.0)
    data = CountingDataset(batch_size * batches, channels, size)
    warm = CountingDataset(batch_size * 2, channels, size, seed=1)  # two Poisson batches
    result = CaseResult(name, f"{channels}x{size}x{size}", count_parameters(model), batch_size, 0.0)
    result.chosen_mode = chosen
    modes = [chosen if m == "chosen" else m for m in modes]
    _fit_rate(model, warm, spec, device, None)  # allocator, kernels, lazy imports
    for mode in modes:
        try:
            _fit_rate(model, warm, spec, device, mode)
        except Exception as err:
            result.errors[mode] = f"{type(err).__name__}: {err}"[:200]
    plain: list[float] = []
    dp: dict[str, list[float]] = {m: [] for m in modes if m not in result.errors}
    for _ in range(repeats):
        plain.append(_fit_rate(model, data, spec, device, None))
        for mode in dp:
            dp[mode].append(_fit_rate(model, data, spec, device, mode))
    result.plain_samples_per_s = statistics.median(plain)
    result.dp_samples_per_s = {m: statistics.median(v) for m, v in dp.items()}
    return result


def render(results: list[CaseResult], modes: list[str], title: str) -> Table:
    """One row per model: plain samples/s, then each mode's samples/s and ratio to plain."""
    table = Table(title=title)
    for col in ("model", "input", "params", "plain /s"):
        table.add_column(col, justify="left" if col in ("model", "input") else "right")
    for mode in modes:
        table.add_column(f"{mode} /s (×)", justify="right")
    table.add_column("chosen", justify="left")
    table.add_column("chosen ×", justify="right")
    for r in results:
        row = [r.model, r.input, f"{r.params:,}", f"{r.plain_samples_per_s:,.0f}"]
        for mode in modes:
            value = r.dp_samples_per_s.get(mode)
            if value is None:
                row.append("failed" if mode in r.errors else "–")
            else:
                mark = "*" if mode == r.chosen_mode else ""
                row.append(f"{value:,.0f} ({r.ratios[mode]:.2f}){mark}")
        row += [r.chosen_mode, f"{r.chosen_ratio:.2f}" if r.chosen_ratio else "–"]
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few batches: finishes in < 2 min")
    parser.add_argument(
        "--modes",
        nargs="*",
        default=None,
        help=f"grad-sample modes to time (default all: {' '.join(GRAD_SAMPLE_MODES)}); "
        "'chosen' = only the mode each model gets",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 quick, 64 full")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 = torch's default, all cores)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 1 quick, 3 full")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="In CPU autocast")  # Opacus functorch, harmless
    logging.getLogger("fedcl.privacy").setLevel(logging.ERROR)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or (32 if args.quick else 64)
    requested = list(GRAD_SAMPLE_MODES) if args.modes is None else args.modes
    bad = set(requested) - {*GRAD_SAMPLE_MODES, "chosen"}
    if bad:
        parser.error(f"unknown modes {sorted(bad)}; valid: {GRAD_SAMPLE_MODES} or chosen")
    cases = [c for c in CASES if args.models is None or c[0] in args.models]
    unknown = set(args.models or []) - set(available_models())
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; valid: {available_models()}")

    console = Console(width=max(Console().width, 120))  # the table stays readable in logs
    results: list[CaseResult] = []
    started = time.perf_counter()
    for name, channels, size in cases:
        heavy = name in HEAVY
        batches = (2 if heavy else 4) if args.quick else (6 if heavy else 20)
        repeats = args.repeats or (1 if args.quick else 3)
        t0 = time.perf_counter()
        result = run_case(
            name,
            channels,
            size,
            batch_size=batch_size,
            batches=batches,
            repeats=repeats,
            modes=requested,
            device=args.device,
        )
        results.append(result)
        console.print(
            f"{name} {result.input}: plain {result.plain_samples_per_s:,.0f}/s, DP "
            + ", ".join(f"{m} {v:,.0f}/s" for m, v in result.dp_samples_per_s.items())
            + (f", failed: {result.errors}" if result.errors else "")
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    elapsed = time.perf_counter() - started
    meta: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": args.repeats or (1 if args.quick else 3),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
        "seconds": round(elapsed, 1),
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "poisson_sampling": True},
    }
    title = (
        f"DP-SGD throughput ({args.device}, {meta['threads']} threads, batch {batch_size}"
        f"{', quick' if args.quick else ''}; samples/s and DP/plain, median of interleaved "
        "repeats; * = the mode choose_grad_sample_mode picks)"
    )
    shown = [m for m in GRAD_SAMPLE_MODES if any(m in r.dp_samples_per_s for r in results)]
    console.print(render(results, shown, title))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "results": [
            asdict(r) | {"ratios": r.ratios, "chosen_ratio": r.chosen_ratio} for r in results
        ],
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.output} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
