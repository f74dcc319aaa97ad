"""The GPU path, checked on a machine with CUDA (not part of CI: the test boxes have no GPU).

1. **Training steps on CUDA**: a site's ``LocalTrainer`` with ``device = "auto"`` on a CNN,
   plain (bfloat16 autocast), with FedProx (its global weights must follow the model onto the
   GPU) and with DP-SGD (the mode ``choose_grad_sample_mode`` picks, fp32): asserts that every
   parameter ends on CUDA and times samples/s against the same steps on the CPU.
2. **Virtual sites on a fractional GPU**: ``fedcl simulate``'s runner on Flower's Ray engine,
   ``simulation.num_gpus = 0.25`` (four sites per GPU), a tiny digits federation; while it runs,
   ``nvidia-smi`` is polled for processes holding GPU memory: the site actors (not this driver)
   must appear. Timed against the same run with ``num_gpus = 0`` (the sites on the CPU).

    python benchmarks/gpu_check.py            # ~2-4 min on one GPU; exits 0 with a message here

Prints what it saw and writes ``benchmarks/results/gpu_check.json``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedcl.client.device import cuda_unavailable_reason, resolve_device
from fedcl.client.trainer import LocalTrainer, ProximalTerm
from fedcl.config.experiment import TrainSpec
from fedcl.models import build_model
from fedcl.privacy import DPHook, choose_grad_sample_mode

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"


def _fit(device: str, *, prox: bool, dp: bool, n: int = 512, batch: int = 64) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model("cnn", in_channels=3, image_size=32, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,)))
    hooks: list[Any] = []
    if dp:
        hooks.append(DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5))
    if prox:
        hooks.append(ProximalTerm(0.01, [p for p in model.parameters()]))
    trainer = LocalTrainer(TrainSpec(batch_size=batch, lr=0.05), device=device)
    trainer.fit(model, TensorDataset(*data[:batch]), hooks=list(hooks))  # warm-up, kernels
    if dp:
        hooks[0] = DPHook(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.fit(model, data, hooks=hooks)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    devices = sorted({str(p.device) for p in model.parameters()})
    return {
        "device": str(trainer.device),
        "param_devices": devices,
        "steps": result.steps,
        "samples_per_s": n / seconds,
        "grad_sample_mode": choose_grad_sample_mode(model) if dp else None,
    }


def check_training_steps() -> tuple[list[dict[str, Any]], list[str]]:
    rows, failures = [], []
    for prox, dp in ((False, False), (True, False), (False, True), (True, True)):
        gpu = _fit("auto", prox=prox, dp=dp)
        cpu = _fit("cpu", prox=prox, dp=dp)
        label = "+".join(["plain"] + (["fedprox"] if prox else []) + (["dp"] if dp else []))
        row = {
            "case": label,
            "cuda": gpu,
            "cpu": cpu,
            "speedup": gpu["samples_per_s"] / cpu["samples_per_s"],
        }
        rows.append(row)
        if not all(d.startswith("cuda") for d in gpu["param_devices"]):
            failures.append(f"{label}: parameters ended on {gpu['param_devices']}, not CUDA")
        print(
            f"{label:18s} cuda {gpu['samples_per_s']:9,.0f}/s  cpu {cpu['samples_per_s']:9,.0f}/s"
            f"  x{row['speedup']:.1f}  params on {gpu['param_devices']}"
        )
    return rows, failures


class GpuProcesses:
    """Polls ``nvidia-smi`` for the pids holding GPU memory while a run goes on."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.pids: set[int] = set()
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuProcesses:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            self.pids |= {int(x) for x in out.split() if x.strip().isdigit()}
            self._stop.wait(self.interval)


def _simulate(num_gpus: float, out: Path) -> dict[str, Any]:
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import SimulationPlan, run_plan

    label, experiment = load_scenario(
        "digits-domain-il",
        [
            "simulation.num_sites=4",
            f"simulation.num_gpus={num_gpus}",
            "simulation.num_cpus=1",
            "data.num_tasks=2",
            "train.rounds_per_task=2",
        ],
    )
    start = time.perf_counter()
    with GpuProcesses() as gpu:
        results = run_plan(SimulationPlan(experiment, label, out, f"gpu-{num_gpus}", engine="ray"))
    rounds = [r["seconds"] for r in results["rounds"] if r.get("seconds") is not None]
    return {
        "num_gpus": num_gpus,
        "status": results["status"],
        "wall_s": time.perf_counter() - start,
        "s_per_round": sum(rounds) / len(rounds) if rounds else None,
        "avg_accuracy": results.get("avg_accuracy"),
        "gpu_pids": sorted(gpu.pids - {os.getpid()}),
        "nvidia_smi": gpu.available,
    }


def check_simulation() -> tuple[list[dict[str, Any]], list[str]]:
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="fedcl-gpu-") as tmp:
        for num_gpus in (0.25, 0.0):
            row = _simulate(num_gpus, Path(tmp) / f"gpus-{num_gpus}")
            rows.append(row)
            print(
                f"simulation num_gpus={num_gpus}: {row['status']}, wall {row['wall_s']:.1f} s, "
                f"{row['s_per_round'] or float('nan'):.2f} s/round, site processes on the GPU: "
                f"{row['gpu_pids'] if row['nvidia_smi'] else 'nvidia-smi not found'}"
            )
            if row["status"] != "completed":
                failures.append(f"simulation num_gpus={num_gpus} ended {row['status']}")
    on_gpu = rows[0]
    if on_gpu["nvidia_smi"] and not on_gpu["gpu_pids"]:
        failures.append("num_gpus=0.25: no site process held GPU memory (sites trained on CPU?)")
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--skip-simulation", action="store_true", help="training steps only")
    args = parser.parse_args(argv)
    why = cuda_unavailable_reason()
    if why is not None:
        print(f"no CUDA here ({why}): nothing to check; run this on a machine with a GPU")
        return 0
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    logging.getLogger("fedcl.privacy").setLevel(logging.ERROR)
    print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    assert resolve_device("auto").type == "cuda"
    steps, failures = check_training_steps()
    simulation: list[dict[str, Any]] = []
    if not args.skip_simulation:
        simulation, more = check_simulation()
        failures += more
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "training_steps": steps,
        "simulation": simulation,
        "failures": failures,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
