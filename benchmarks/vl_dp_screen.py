"""Quick DP screen of defects-vl recipes: FedAvg of fedcl's LocalTrainer + DPHook in one process.

    python benchmarks/vl_dp_screen.py NAME [--set-style overrides ...]

Why: a whole ``fedcl simulate`` costs the coordinator, registry and per-round evaluation on top
of training; this replays only the arithmetic (the scenario's 5 sites and shards, each site's σ
from ``plan_noise`` over rounds × epochs × k at its own N, as the site plans it; the
example-weighted mean; the accuracy matrix's seen and zero-shot columns at the end). It charges no
ledger: a recipe worth keeping is measured again by ``fedcl simulate`` (benchmarks/vl.py). Its
no-DP 2-round run gives the simulation's figures exactly (0.247 / 0.317). One line per run is
appended to ``$OUT/results.jsonl`` (default /tmp/fedcl-vl-screen).
"""

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from fedcl.client.site import load_site_data
from fedcl.client.trainer import LocalTrainer, evaluate
from fedcl.config import SiteConfig, load_toml
from fedcl.continual.plan import RunPlan
from fedcl.privacy.dp import DPHook, plan_noise, sampling_plan
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import write_site_configs

torch.set_num_threads(1)

name, overrides = sys.argv[1], sys.argv[2:]
exp = load_scenario("defects-vl", ["data.num_tasks=1", *overrides])[1]
OUT = Path(os.environ.get("OUT", "/tmp/fedcl-vl-screen"))
tmp = OUT / name
tmp.mkdir(parents=True, exist_ok=True)
paths = write_site_configs(exp, tmp / "sites")
sites = [load_site_data(exp, load_toml(SiteConfig, p)) for p in paths]
plan = RunPlan.of(exp)
model = plan.initial_model()
tr = exp.train
dp = exp.dp
rounds = tr.rounds_per_task
sig = {}
for i, d in enumerate(sites):
    n = len(d.train_set(0))
    if dp.enabled:
        sp = sampling_plan(n, tr.batch_size)
        sig[i] = dp.noise_multiplier or plan_noise(
            epsilon=dp.epsilon,
            delta=dp.delta,
            sample_rate=sp.sample_rate,
            steps=rounds * tr.local_epochs * sp.batches_per_epoch,
        )
print(
    name,
    "N",
    [len(d.train_set(0)) for d in sites],
    "sigma",
    {k: round(v, 3) for k, v in sig.items()},
    flush=True,
)
t0 = time.time()


def score(m):
    out = []
    for j in range(len(sites[0].stream.evaluation_tasks)):
        c = n = 0
        for d in sites:
            cc, nn, _ = evaluate(m, d.test_set(j), output_mask=d.stream.eval_mask(j))
            c += cc
            n += nn
        out.append(c / n)
    s, u = out[0], out[-1]
    return s, u, 2 * s * u / (s + u) if s + u else 0.0


for r in range(rounds):
    states, weights = [], []
    for i, d in enumerate(sites):
        m = copy.deepcopy(model)
        hooks = (
            [DPHook(noise_multiplier=sig[i], max_grad_norm=dp.max_grad_norm, delta=dp.delta)]
            if dp.enabled
            else []
        )
        res = LocalTrainer(tr, seed=exp.seed * 100_003 + r).fit(
            m, d.train_set(0), output_mask=d.stream.train_mask(0), hooks=hooks
        )
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        weights.append(res.num_examples)
    tot = sum(weights)
    model.load_state_dict(
        {k: sum(s[k] * (w / tot) for s, w in zip(states, weights, strict=True)) for k in states[0]}
    )
    if r in (rounds // 2 - 1, rounds - 1) or os.environ.get("EVERY"):
        s, u, h = score(model)
        print(
            f"{name} round {r + 1}: seen {s:.3f} unseen {u:.3f} H {h:.3f} "
            f"t {time.time() - t0:.0f}s",
            flush=True,
        )
s, u, h = score(model)
with open(OUT / "results.jsonl", "a") as f:
    f.write(
        json.dumps(
            {
                "name": name,
                "overrides": overrides,
                "seen": s,
                "unseen": u,
                "H": h,
                "sigma": sig,
                "s": time.time() - t0,
            }
        )
        + "\n"
    )
