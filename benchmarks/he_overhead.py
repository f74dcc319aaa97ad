"""What CKKS-encrypted aggregation costs, per fp32 parameter, against plaintext Flower and TenSEAL's
common default parameters.

    python benchmarks/he_overhead.py [--quick] [--sites 10] [--max-sites 20] [--out FILE]

For a 1M-parameter update and ResNet-18-GN (11.2M), in one run:

* **fedcl CKKS**: N = 4096, primes [60, 49], 15-bit stochastic quantisation, the packing
  ``packing_for`` gives a round of ``--max-sites`` (20: two values per slot; 5, the default
  scenario's round: two and a 2-bit spill field, 2.125). Encrypt = quantise + pack + encrypt +
  serialize at a site (worker processes, pool already started; its start-up is reported separately);
  aggregate = validate + deserialize + add one site's reply at the coordinator (public context);
  decrypt = decrypt + unpack + dequantise the aggregate at a site.
* **plaintext Flower**: ``ArrayRecord`` of the float32 state dict (bytes on the wire, time to
  build it) and a numpy weighted sum per site.
* **TenSEAL default**: N = 8192, primes [60, 40, 40, 60], scale 2^40, one float per slot, no
  packing, one process (the common tutorial setting).

Per-parameter costs do not depend on model size, so ``--quick`` measures the CKKS paths on a
prefix of ResNet-18-GN (bytes per parameter are still computed for the whole model). The table is
printed with rich and the numbers are written as JSON (``benchmarks/results/he_overhead.json``).
Heavy imports live inside functions: the CKKS worker processes re-import this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "he_overhead.json"


def _timed(fn, *args, repeat: int = 1, **kwargs):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def parallel_capacity(workers: int) -> float:
    """Speed-up of a pure-Python burn in ``workers`` processes: how much parallelism this
    machine has free right now (on a busy shared box the CKKS pool cannot beat 1x either)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n = 4_000_000
    start = time.perf_counter()
    for _ in range(workers):
        _burn(n)
    serial = time.perf_counter() - start
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_burn, [10] * workers))
        start = time.perf_counter()
        list(pool.map(_burn, [n] * workers))
        parallel = time.perf_counter() - start
    return serial / parallel


def _models(quick: bool) -> list[tuple[str, dict, int]]:
    """(name, state dict of float32 numpy arrays to measure on, parameters of the full model)."""
    import numpy as np
    import torch

    from fedcl.models import build_model

    rng = np.random.default_rng(0)
    dense = {"weight": rng.normal(0, 0.01, (1000, 1000)).astype(np.float32)}
    torch.manual_seed(0)
    model = build_model("resnet18-gn", in_channels=3, image_size=32, num_classes=10)
    full = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    total = sum(v.size for v in full.values())
    if quick:  # a prefix of the layers (~2M values): per-parameter costs are what is reported
        sub, n = {}, 0
        for k, v in full.items():
            if n >= 2_000_000:
                break
            sub[k] = v
            n += v.size
        measured = sub
    else:
        measured = full
    # A plausible update: small values around zero (what sites actually encrypt).
    resnet = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in measured.items()}
    return [("1M dense", dense, 1_000_000), ("ResNet-18-GN", resnet, total)]


def bench_fedcl(
    name: str, delta: dict, full_params: int, sites: int, keys_dir: Path, max_sites: int = 20
) -> dict:
    import numpy as np

    from fedcl.config.experiment import HESpec
    from fedcl.privacy.ckks import parallel
    from fedcl.privacy.ckks.codec import Layout
    from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
    from fedcl.privacy.ckks.packing import packing_for
    from fedcl.privacy.ckks.params import CKKSParams
    from fedcl.privacy.ckks.wire import (
        EncryptedSum,
        ExpectedReply,
        decode_aggregate,
        encrypt_update,
    )

    files = init_keys(keys_dir, force=True)
    secret, public = load_secret_context(files.secret), load_public_context(files.public)
    # The packing a round of ``max_sites`` gets (``[he]`` defaults but the clip of the deltas).
    packing = packing_for(HESpec(enabled=True, max_sites=max_sites, clip=0.5))
    layout = Layout.from_state_dict(delta)
    n = layout.num_values
    workers = parallel.plan_workers(10_000)
    start = time.perf_counter()  # start the worker pool with two tiny blocks
    parallel.encrypt_rows([np.zeros(1)] * workers, secret, 2.0**18, workers=workers, min_blocks=1)
    pool_start = time.perf_counter() - start
    encrypt_update(delta, 100, secret, packing, layout=layout)  # warm-up
    # One fresh encryption per site: identical ciphertexts would be refused as replays.
    replies, enc_times = [], []
    for _ in range(sites):
        t, enc = _timed(encrypt_update, delta, 1000, secret, packing, layout=layout)
        replies.append(enc)
        enc_times.append(t)
    enc_s = float(np.median(enc_times))
    enc1_s, _ = _timed(encrypt_update, delta, 1000, secret, packing, layout=layout, workers=1)
    wire = sum(len(enc.arrays[k].data) for k in enc.arrays)
    meta_bytes = len(json.dumps(dict(enc.meta)))
    expected = ExpectedReply.build(public, packing, layout)
    total = EncryptedSum(expected)
    add_times = []
    for enc in replies:
        t, _ = _timed(total.add, enc.arrays, enc.meta)
        add_times.append(t)
    del replies
    res_s, (agg_arrays, agg_meta) = _timed(total.result)
    agg_wire = sum(len(agg_arrays[key].data) for key in agg_arrays)  # full-size sums, down
    dec_s, (mean, count, k) = _timed(decode_aggregate, agg_arrays, agg_meta, secret, layout=layout)
    assert (count, k) == (1000 * sites, sites)
    err = max(float(np.max(np.abs(mean[name_] - delta[name_]))) for name_ in delta)
    full_blocks = packing.num_blocks(full_params, CKKSParams())
    return {
        "model": name,
        "scheme": "fedcl CKKS",
        "parameters": (
            f"N=4096 [60,49], {packing.bits}-bit stochastic, {packing.values_per_slot} "
            f"values/slot{f' + {packing.spill_bits}-bit spill' if packing.spill_bits else ''}, "
            f"headroom {packing.max_sites} sites"
        ),
        "values_per_slot_effective": packing.values_per_slot_effective,
        "params_full": full_params,
        "params_measured": n,
        "bytes_per_param": full_blocks * (wire / int(enc.meta["ckks-blocks"])) / full_params,
        "bytes_per_param_measured": wire / n,
        # Sites send seeded blocks (half size, privacy/ckks/seeded.py); aggregates are full.
        "bytes_per_param_down": (
            full_blocks * (agg_wire / int(agg_meta["ckks-blocks"])) / full_params
        ),
        "meta_bytes": meta_bytes,
        "encrypt_us_per_param": enc_s / n * 1e6,
        "encrypt_us_per_param_1proc": enc1_s / n * 1e6,
        "aggregate_us_per_param_per_site": float(np.median(add_times)) / n * 1e6,
        "aggregate_serialize_us_per_param": res_s / n * 1e6,
        "decrypt_us_per_param": dec_s / n * 1e6,
        "workers": workers,
        "pool_start_s": pool_start,
        "max_abs_error_of_mean": err,
        "error_bound": packing.error_bound(sites, 1000 * sites),
    }


def bench_plaintext(name: str, delta: dict, full_params: int, sites: int) -> dict:
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    state = {k: torch.from_numpy(v) for k, v in delta.items()}
    n = sum(v.size for v in delta.values())
    ser_s, rec = _timed(ArrayRecord, state, repeat=3)
    wire = sum(len(rec[k].data) for k in rec)
    flat = [np.concatenate([v.reshape(-1) for v in delta.values()]) for _ in range(2)]

    def weighted_sum():
        acc = np.zeros(n, dtype=np.float64)
        for i in range(sites):
            acc += flat[i % 2] * 1000.0
        return acc

    agg_s, _ = _timed(weighted_sum, repeat=2)
    return {
        "model": name,
        "scheme": "plaintext",
        "parameters": "Flower ArrayRecord of float32; numpy weighted sum",
        "params_full": full_params,
        "params_measured": n,
        "bytes_per_param": wire / n,
        "encrypt_us_per_param": ser_s / n * 1e6,
        "aggregate_us_per_param_per_site": agg_s / sites / n * 1e6,
        "decrypt_us_per_param": 0.0,
    }


def bench_tenseal_default(
    name: str, delta: dict, full_params: int, sites: int, sample: int
) -> dict:
    import numpy as np
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60], n_threads=1)
    public = ts.context_from(
        ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    )
    flat = np.concatenate([v.reshape(-1) for v in delta.values()])[:sample].astype(np.float64)
    slots = 4096
    rows = [flat[i : i + slots] for i in range(0, flat.shape[0], slots)]
    scale = 2.0**40

    def encrypt():
        return [ts.ckks_vector(ctx, r.tolist(), scale=scale).serialize() for r in rows]

    enc_s, blocks = _timed(encrypt)
    wire = sum(len(b) for b in blocks)

    def aggregate():
        acc = [ts.ckks_vector_from(public, b) for b in blocks]
        for _ in range(sites - 1):
            for a, b in zip(acc, blocks, strict=True):
                a.add_(ts.ckks_vector_from(public, b))
        return [a.serialize() for a in acc]

    agg_s, summed = _timed(aggregate)

    def decrypt():
        return np.concatenate([ts.ckks_vector_from(ctx, b).decrypt() for b in summed])

    dec_s, out = _timed(decrypt)
    n = flat.shape[0]
    return {
        "model": name,
        "scheme": "TenSEAL default",
        "parameters": "N=8192 [60,40,40,60], scale 2^40, 1 float/slot, 1 process",
        "params_full": full_params,
        "params_measured": n,
        "bytes_per_param": wire / n,
        "encrypt_us_per_param": enc_s / n * 1e6,
        "aggregate_us_per_param_per_site": agg_s / sites / n * 1e6,
        "decrypt_us_per_param": dec_s / n * 1e6,
        "max_abs_error_of_sum": float(np.max(np.abs(out - sites * flat))),
    }


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CKKS overhead per fp32 parameter (µs per parameter)")
    cols = (
        "model",
        "scheme",
        "measured",
        "B/param up / down",
        "x fp32",
        "encrypt",
        "agg/site",
        "decrypt",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "scheme") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["scheme"],
            f"{r['params_measured'] / 1e6:.2f}M/{r['params_full'] / 1e6:.2f}M",
            f"{r['bytes_per_param']:.2f}"
            + (f" / {r['bytes_per_param_down']:.2f}" if "bytes_per_param_down" in r else ""),
            f"{r['bytes_per_param'] / 4:.2f}"
            + (f" / {r['bytes_per_param_down'] / 4:.2f}" if "bytes_per_param_down" in r else ""),
            f"{r['encrypt_us_per_param']:.3f}",
            f"{r['aggregate_us_per_param_per_site']:.3f}",
            f"{r['decrypt_us_per_param']:.3f}",
        )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        params = next(r["parameters"] for r in rows if r["scheme"] == scheme)
        console.print(f"  {scheme}: {params}", highlight=False)
    for r in rows:
        if "encrypt_us_per_param_1proc" in r:
            console.print(
                f"  {r['model']}: fedcl encrypt {r['encrypt_us_per_param_1proc']:.3f} µs/p in one "
                f"process, {r['encrypt_us_per_param']:.3f} with {r['workers']} workers (pool start "
                f"{r['pool_start_s']:.1f} s); max |mean error| {r['max_abs_error_of_mean']:.2e} "
                f"≤ bound {r['error_bound']:.2e}",
                highlight=False,
            )


def bench_rounds(seeds: int) -> dict:
    """Whole rounds of the default scenario (same apps, in-process), HE off vs on, per seed.

    The seeds alternate off/on so load on a shared machine hits both alike; accuracy is
    reported too: HE's quantisation is the only difference, so the two should agree.
    """
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import SimulationPlan, run_plan

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for he in (False, True):
                label, exp = load_scenario(
                    "digits-domain-il", [f"seed={seed}", f"he.enabled={str(he).lower()}"]
                )
                res = run_plan(
                    SimulationPlan(exp, label, Path(tmp) / f"{seed}-{he}", "r", "inprocess")
                )
                train = [r for r in res["rounds"] if r["kind"] == "train"]
                runs.append(
                    {
                        "seed": seed,
                        "he": he,
                        "seconds_per_round": sum(r["seconds"] for r in train) / len(train),
                        "bytes_up_per_round": sum(r["bytes_up"] for r in train) / len(train),
                        "avg_accuracy": res["avg_accuracy"],
                    }
                )

    def mean(he: bool, key: str) -> float:
        vals = [r[key] for r in runs if r["he"] == he]
        return sum(vals) / len(vals)

    summary = {
        "runs": runs,
        "seconds_per_round_off": mean(False, "seconds_per_round"),
        "seconds_per_round_on": mean(True, "seconds_per_round"),
        "round_time_ratio": mean(True, "seconds_per_round") / mean(False, "seconds_per_round"),
        "bytes_up_ratio": mean(True, "bytes_up_per_round") / mean(False, "bytes_up_per_round"),
        "accuracy_off": mean(False, "avg_accuracy"),
        "accuracy_on": mean(True, "avg_accuracy"),
    }
    from rich.console import Console

    Console().print(
        f"default scenario (digits-domain-il, 5 sites, {seeds} seed(s)): "
        f"{summary['seconds_per_round_off']:.2f} s/round HE off, "
        f"{summary['seconds_per_round_on']:.2f} s/round HE on → "
        f"{summary['round_time_ratio']:.2f}x; bytes up {summary['bytes_up_ratio']:.2f}x; "
        f"ACC {summary['accuracy_off']:.4f} off vs {summary['accuracy_on']:.4f} on",
        highlight=False,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18-GN on a ~2M prefix")
    parser.add_argument("--sites", type=int, default=10, help="replies summed at the coordinator")
    parser.add_argument(
        "--max-sites",
        type=int,
        default=20,
        help="he.max_sites of the packing (headroom, spill); 5 is the default scenario's round",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--round-seeds",
        type=int,
        default=1,
        help="seeds of the default scenario run with HE off and on (0 skips the round timing)",
    )
    args = parser.parse_args(argv)

    import tempfile

    from fedcl.privacy.ckks import parallel

    capacity = parallel_capacity(max(2, parallel.plan_workers(10_000)))
    rows: list[dict] = []
    ratios: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, delta, full in _models(args.quick):
            fed = bench_fedcl(name, delta, full, args.sites, Path(tmp) / "keys", args.max_sites)
            plain = bench_plaintext(name, delta, full, args.sites)
            sample = 500_000 if args.quick else 2_000_000
            default = bench_tenseal_default(name, delta, full, args.sites, sample)
            rows += [fed, plain, default]
            ratios[name] = {
                "bytes_vs_plaintext": fed["bytes_per_param"] / plain["bytes_per_param"],
                "bytes_vs_tenseal_default": fed["bytes_per_param"] / default["bytes_per_param"],
                "encrypt_vs_plaintext_serialization": fed["encrypt_us_per_param"]
                / plain["encrypt_us_per_param"],
                "aggregate_vs_plaintext": fed["aggregate_us_per_param_per_site"]
                / plain["aggregate_us_per_param_per_site"],
                "encrypt_vs_tenseal_default": fed["encrypt_us_per_param"]
                / default["encrypt_us_per_param"],
                "aggregate_vs_tenseal_default": fed["aggregate_us_per_param_per_site"]
                / default["aggregate_us_per_param_per_site"],
            }
    parallel.shutdown()
    render(rows)
    print(f"free parallelism (control, pure-Python burn): {capacity:.2f}x")
    for name, r in ratios.items():
        print(
            f"{name}: {r['bytes_vs_plaintext']:.2f}x plaintext bytes, "
            f"{r['bytes_vs_tenseal_default']:.2f}x TenSEAL-default bytes; encrypt "
            f"{r['encrypt_vs_plaintext_serialization']:.0f}x plaintext serialization, "
            f"{r['encrypt_vs_tenseal_default']:.2f}x TenSEAL default; aggregate "
            f"{r['aggregate_vs_plaintext']:.0f}x numpy, "
            f"{r['aggregate_vs_tenseal_default']:.2f}x TenSEAL default"
        )
    round_report = bench_rounds(args.round_seeds) if args.round_seeds else None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {
        "quick": args.quick,
        "sites": args.sites,
        "max_sites": args.max_sites,
        "machine": {
            "cpus": parallel.available_cpus(),
            "load_average": load,
            "parallel_speedup_control": capacity,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "rows": rows,
        "ratios": ratios,
        "rounds": round_report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
