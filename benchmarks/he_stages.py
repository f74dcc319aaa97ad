"""Where an HE round's time goes (issue 14): the default scenario's model, 5 sites in one process.

    python benchmarks/he_stages.py [--rounds 30] [--scenario digits-domain-il]

Each round: every site's codec encrypts its update (``CKKSCodec.encode_update``: quantise,
pack, checksum, seeded SEAL encryption), the coordinator validates and sums them under the
public context (``EncryptedSum``) and serializes the aggregate, and every site decodes it
(``CKKSCodec.decode``). Prints the median and the minimum of each stage over ``--rounds``
rounds (the minimum is what a loaded, shared box distorts least), wall and this process's CPU
time (what a shared box distorts less), then the SEAL calls alone,
each timed in a loop, and the SEAL work of one round they add up to. Why: the round-time
ratio HE on / off (``suite.py --only he``) says how much HE costs, this says where, and how
much of it no Python change can remove. Torch runs one thread; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _median_ms(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--scenario", default="digits-domain-il")
    args = parser.parse_args(argv)

    import numpy as np
    import tenseal as ts
    import tenseal.sealapi as sa
    import torch
    from flwr.app import RecordDict

    from fedcl.client.codec import CKKSCodec
    from fedcl.config import SiteConfig
    from fedcl.config import protocol as P
    from fedcl.continual.plan import RunPlan
    from fedcl.privacy.ckks import packing_for
    from fedcl.privacy.ckks.complex_slots import to_complex
    from fedcl.privacy.ckks.keys import load_public_context
    from fedcl.privacy.ckks.layout import Layout
    from fedcl.privacy.ckks.seeded import _Scratch, decryptor_for, encryptor_for
    from fedcl.privacy.ckks.wire import EncryptedSum, ExpectedReply
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import prepare_keys

    torch.set_num_threads(1)
    scratch_dir = tempfile.TemporaryDirectory(prefix="fedcl-he-stages-")  # keys, removed at exit
    tmp = Path(scratch_dir.name)
    _, exp = load_scenario(args.scenario, ["he.enabled=true", "seed=0"])
    exp = prepare_keys(exp, tmp)
    state = {k: v.detach().clone() for k, v in RunPlan.of(exp).initial_model().state_dict().items()}
    key = Path(exp.he.public_context).with_name("secret.ctx")
    n_sites = exp.round_sites
    sites = [
        SiteConfig(site_id=f"site-{i}", state_dir=tmp / f"s{i}", key_path=key)
        for i in range(n_sites)
    ]
    public = load_public_context(exp.he.public_context)
    expected = ExpectedReply.build(public, packing_for(exp.he), Layout.from_state_dict(state))

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    states = [{k: v + 0.001 * i for k, v in state.items()} for i in range(n_sites)]

    def one_round(r: int) -> dict[str, tuple[float, float]]:
        codecs = [CKKSCodec(exp, s) for s in sites]
        t0 = clock()
        replies = [c.encode_update(states[i], 100 + i, "", r)[0] for i, c in enumerate(codecs)]
        t1 = clock()
        total = EncryptedSum(expected)
        for rec in replies:
            total.add(rec[P.ARRAYS], rec[P.meta_key(P.ARRAYS)])
        t2 = clock()
        arrays, meta = total.result()
        t3 = clock()
        content = RecordDict({P.ARRAYS: arrays, P.meta_key(P.ARRAYS): meta})
        for c in codecs:
            c.decode(content, P.ARRAYS, state)
        t4 = clock()
        marks = [t0, t1, t2, t3, t4]
        names = ["sites encrypt", "coordinator load+add", "coordinator serialize", "sites decode"]
        t = {
            n: (b[0] - a[0], b[1] - a[1])
            for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)
        }
        t["round"] = (t4[0] - t0[0], t4[1] - t0[1])
        return t

    one_round(0)
    rows = [one_round(r + 1) for r in range(args.rounds)]
    stages = {
        k: {
            "median_ms": 1000 * statistics.median(x[k][0] for x in rows),
            "min_ms": 1000 * min(x[k][0] for x in rows),
            "cpu_median_ms": 1000 * statistics.median(x[k][1] for x in rows),
            "cpu_min_ms": 1000 * min(x[k][1] for x in rows),
        }
        for k in rows[0]
    }

    ctx = CKKSCodec(exp, sites[0]).ctx
    enc = encryptor_for(ctx)
    ints = np.random.default_rng(0).integers(0, 2**40, 2 * enc.slots).astype(np.float64)
    row = to_complex(ints).tolist()  # two slot integers per CKKS slot (wire format 4)
    scale = 2.0**expected.scale_bits
    plain = sa.Plaintext()
    enc.encoder.encode(row, scale, plain)
    ct = enc.encryptor.encrypt_symmetric(plain)
    seal: dict[str, float] = {}
    seal["site encode"] = _median_ms(lambda: enc.encoder.encode(row, scale, plain))
    seal["site encrypt_symmetric"] = _median_ms(lambda: enc.encryptor.encrypt_symmetric(plain))
    with _Scratch() as scratch:
        seal["site save (zstd)"] = _median_ms(lambda: ct.save(scratch.path))
    seeded = enc.encrypt([ints], scale)[0]
    seal["coordinator load (seed expansion)"] = _median_ms(
        lambda: ts.ckks_vector_from(public, seeded)
    )
    v, w = ts.ckks_vector_from(public, seeded), ts.ckks_vector_from(public, seeded)
    seal["coordinator add"] = _median_ms(lambda: v.add_(w))
    seal["coordinator serialize"] = _median_ms(lambda: v.serialize())
    full = v.serialize()
    dec = decryptor_for(ctx)
    seal["site load+decrypt+decode"] = _median_ms(lambda: dec.decrypt([full]))
    blocks = expected.num_blocks
    per_round = (
        n_sites
        * blocks
        * (seal["site encode"] + seal["site encrypt_symmetric"] + seal["site save (zstd)"])
        + n_sites * blocks * seal["coordinator load (seed expansion)"]
        + (n_sites - 1) * blocks * seal["coordinator add"]
        + blocks * seal["coordinator serialize"]
        + blocks * seal["site load+decrypt+decode"]  # once per process
    )
    doc = {
        "scenario": args.scenario,
        "sites": n_sites,
        "parameters": expected.num_values,
        "blocks": blocks,
        "stages": stages,
        "seal_call_ms": seal,
        "seal_ms_per_round": per_round,
    }
    print(json.dumps(doc, indent=1))
    scratch_dir.cleanup()
    return doc


if __name__ == "__main__":
    main()
