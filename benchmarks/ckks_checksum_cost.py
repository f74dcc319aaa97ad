"""What the aggregate checksum costs: bytes per parameter and encrypt/decrypt time.

Measures the default scenario's model (``mlp`` on 1x8x8 digits, 17,226 parameters) with the
``[he]`` defaults: one site's reply size, encrypting it, summing ``--sites`` replies at the
coordinator, and decrypting + decoding the aggregate at a site (in-process, one worker), each
the median of ``--repeat`` runs. Run it before and after a change to the codec::

    .venv/bin/python benchmarks/ckks_checksum_cost.py --repeat 7

It prints one JSON object. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sites", type=int, default=5)
    args = parser.parse_args()

    from fedcl.models import build_model
    from fedcl.privacy.ckks.codec import Layout, Packing
    from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
    from fedcl.privacy.ckks.wire import (
        EncryptedSum,
        ExpectedReply,
        decode_aggregate,
        encrypt_update,
    )

    model = build_model("mlp", in_channels=1, image_size=8, num_classes=10)
    state = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    layout = Layout.from_state_dict(state)
    packing = Packing(clip=4.0)  # the [he] defaults (HESpec.clip = 4.0)
    with tempfile.TemporaryDirectory() as keys:
        files = init_keys(keys)
        secret, public = load_secret_context(files.secret), load_public_context(files.public)
    expected = ExpectedReply.build(public, packing, layout)

    def timed(fn, *a, **kw):
        start = time.perf_counter()
        out = fn(*a, **kw)
        return time.perf_counter() - start, out

    enc_s, sum_s, dec_s = [], [], []
    for r in range(args.repeat):
        replies = []
        for i in range(args.sites):
            t, enc = timed(
                encrypt_update,
                state,
                100 + i,
                secret,
                packing,
                layout=layout,
                workers=1,
                rng=np.random.default_rng([r, i]),
            )
            enc_s.append(t)
            replies.append(enc)
        total = EncryptedSum(expected)
        start = time.perf_counter()
        for enc in replies:
            total.add(enc.arrays, enc.meta)
        arrays, meta = total.result()
        sum_s.append(time.perf_counter() - start)
        t, _ = timed(decode_aggregate, arrays, meta, secret, layout=layout, workers=1)
        dec_s.append(t)
    reply_bytes = sum(len(replies[0].arrays[k].data) for k in replies[0].arrays)
    checksum_s = []
    try:  # the checksum alone (absent before issue 11)
        from fedcl.privacy.ckks.integrity import checksum_key, checksums

        q = np.random.default_rng(0).integers(0, 2**packing.bits - 1, layout.num_values)
        key = checksum_key(secret)
        for _ in range(args.repeat):
            start = time.perf_counter()
            checksums(q, (1, 100), packing.checksum_moduli, key)
            checksum_s.append(time.perf_counter() - start)
    except ImportError:
        pass
    print(
        json.dumps(
            {
                "parameters": layout.num_values,
                "blocks": expected.num_blocks,
                "slots": packing.slots_needed(layout.num_values),
                "reply_bytes": reply_bytes,
                "bytes_per_parameter": round(reply_bytes / layout.num_values, 3),
                "encrypt_s_median": round(statistics.median(enc_s), 4),
                "coordinator_sum_s_median": round(statistics.median(sum_s), 4),
                "decrypt_decode_s_median": round(statistics.median(dec_s), 4),
                "checksum_s_median": round(statistics.median(checksum_s), 5)
                if checksum_s
                else None,
                "sites": args.sites,
                "repeat": args.repeat,
            }
        )
    )


if __name__ == "__main__":
    main()
