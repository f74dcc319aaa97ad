"""Centralised reference for the ``defects`` benchmark: joint accuracy and naive forgetting.

    python benchmarks/defects_central.py [--model cnn|scatter-cnn] [--n 1000] [--image-size 32]
        [--channels 3] [--epochs 6] [--task-epochs 6] [--out FILE]

Why: a federated, private run can only be judged against what the same model reaches with all
the data in one place and no privacy. This trains a model of the ``defects-domain-il``
scenarios (``--model``: ``cnn`` at channels [8, 16], their model until scatter-cnn, the
default here so the committed reference stays comparable; ``scatter-cnn``, their model now:
fixed scattering features + a small CNN) on the generator's images with an 80/20 split
stratified by class and domain, single-threaded, Adam at lr 3e-3, batch 32:

* ``joint``: all 8 domains at once (the upper reference the federated figures are compared to);
* ``naive``: the 4 materials in turn (domain-IL, both lightings per task), fine-tuning only;
  its accuracy matrix gives ACC and BWT, i.e. whether the domain shift makes it forget.

Prints a table and writes ``benchmarks/results/defects_central.json``
(``defects_central-scatter-cnn.json`` for ``--model scatter-cnn``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: Each model's options as the scenarios use (or used) it.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {"cnn": {"channels": (8, 16)}, "scatter-cnn": {}}
TASKS = 4  # materials; domains are ordered material-major, two lightings each


def _fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: np.ndarray,
    epochs: int,
    seed: int,
) -> None:
    """Plain minibatch Adam over ``idx`` for ``epochs`` epochs (deterministic order)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(idx)
    for _ in range(epochs):
        for batch in ids[torch.randperm(len(ids), generator=order)].split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray) -> float:
    with torch.no_grad():
        ids = torch.from_numpy(idx)
        hits = sum(int((model(x[b]).argmax(1) == y[b]).sum()) for b in ids.split(1024))
    return hits / max(1, len(idx))


def run(
    n: int, image_size: int, channels: int, epochs: int, task_epochs: int, name: str = "cnn"
) -> dict[str, Any]:
    """Generate the data, train joint and naive-sequential, return the figures."""
    from fedcl.datasets import load_builtin, train_test_split_indices
    from fedcl.models import build_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = load_builtin(
        "defects", seed=0, n_per_class_per_domain=n, image_size=image_size, channels=channels
    )
    gen_s = time.perf_counter() - t0
    train, test = train_test_split_indices(
        len(d), test_fraction=0.2, seed=0, stratify=d.y * len(d.domain_names) + d.domain
    )
    x, y, task = torch.from_numpy(d.x), torch.from_numpy(d.y), d.domain // 2

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(
            name, in_channels=channels, image_size=image_size, num_classes=4,
            **MODEL_OPTIONS[name],
        )  # fmt: skip

    t1 = time.perf_counter()
    joint = model()
    _fit(joint, x, y, train, epochs, 0)
    per_domain = [
        _accuracy(joint, x, y, test[d.domain[test] == k]) for k in range(len(d.domain_names))
    ]
    joint_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    naive = model()
    matrix = np.zeros((TASKS, TASKS))
    for t in range(TASKS):
        _fit(naive, x, y, train[task[train] == t], task_epochs, t)
        matrix[t] = [_accuracy(naive, x, y, test[task[test] == k]) for k in range(TASKS)]
    naive_s = time.perf_counter() - t2
    return {
        "model": name,
        "n_per_class_per_domain": n,
        "image_size": image_size,
        "channels": channels,
        "images": len(d),
        "generate_s": round(gen_s, 2),
        "joint": {
            "epochs": epochs,
            "accuracy": _accuracy(joint, x, y, test),
            "per_domain": dict(zip(d.domain_names, per_domain, strict=True)),
            "seconds": round(joint_s, 1),
        },
        "naive": {
            "epochs_per_task": task_epochs,
            "accuracy_matrix": matrix.round(4).tolist(),
            "acc": float(matrix[-1].mean()),
            "bwt": float(np.mean([matrix[-1, k] - matrix[k, k] for k in range(TASKS - 1)])),
            "seconds": round(naive_s, 1),
        },
    }


def main() -> None:
    """Parse arguments, run, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODEL_OPTIONS), default="cnn")
    p.add_argument("--n", type=int, default=1000, help="images per class per domain")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6, help="joint training epochs")
    p.add_argument("--task-epochs", type=int, default=6, help="naive epochs per task")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    out = a.out or RESULTS / (
        "defects_central.json" if a.model == "cnn" else f"defects_central-{a.model}.json"
    )
    res = run(a.n, a.image_size, a.channels, a.epochs, a.task_epochs, a.model)
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__}
    res["timestamp"] = datetime.now(UTC).isoformat(timespec="seconds")
    j, nv = res["joint"], res["naive"]
    print(f"defects {a.image_size}x{a.image_size}x{a.channels}, {res['images']} images, {a.model}")
    print(f"{'':8} {'ACC':>6} {'BWT':>7} {'s':>6}")
    print(f"{'joint':8} {j['accuracy']:6.3f} {'':>7} {j['seconds']:6.1f}")
    print(f"{'naive':8} {nv['acc']:6.3f} {nv['bwt']:7.3f} {nv['seconds']:6.1f}")
    print("joint per domain:", {k: round(v, 3) for k, v in j["per_domain"].items()})
    print("naive matrix (row: after task):", nv["accuracy_matrix"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
