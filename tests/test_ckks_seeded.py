"""Seeded symmetric encryption at the sites (issue 14): half the bytes up, same exact sums.

Real TenSEAL/SEAL keys throughout: sites encrypt with the federation's secret key, the
coordinator validates and adds with the public context only, a site decrypts the aggregate.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import tenseal as ts

from fedcl.privacy.ckks import seeded
from fedcl.privacy.ckks.codec import Layout, Packing, quantise
from fedcl.privacy.ckks.errors import ReplyRejected
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.parallel import decrypt_blocks, encrypt_rows
from fedcl.privacy.ckks.wire import (
    EncryptedSum,
    ExpectedReply,
    WireMeta,
    blocks_to_record,
    decode_aggregate_full,
    encrypt_update,
    record_blocks,
)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory):
    files = init_keys(tmp_path_factory.mktemp("keys"))
    return load_secret_context(files.secret), load_public_context(files.public)


def _blocks(enc) -> list[bytes]:
    m = WireMeta.from_record(enc.meta)
    return record_blocks(enc.arrays, m.num_blocks, m.per_array)


def test_seeded_blocks_are_half_size_and_the_public_context_reads_them(contexts) -> None:
    secret, public = contexts
    assert not seeded.encryptor_for(public).seeded  # the coordinator has no secret key
    rows = [np.arange(4096, dtype=np.float64) * 1000.0]  # two slot integers per CKKS slot
    blocks, _ = encrypt_rows(rows, secret, 2.0**17, workers=1)
    full = ts.ckks_vector(secret, rows[0][:2048].tolist(), scale=2.0**17).serialize()
    assert len(blocks[0]) < 0.51 * len(full)
    vec = ts.ckks_vector_from(public, blocks[0])  # the seed is expanded while loading
    assert vec.size() == 2048 and vec.ciphertext()[0].size() == 2
    assert len(vec.serialize()) == pytest.approx(len(full), abs=64)
    back, _ = decrypt_blocks(blocks, secret, workers=1)
    assert np.array_equal(np.rint(back[0]), rows[0])
    # TenSEAL's own decrypt sees the real parts: the even positions.
    real = np.asarray(ts.ckks_vector_from(secret, blocks[0]).decrypt())
    assert np.array_equal(np.rint(real), rows[0][0::2])
    # Two encryptions of the same row differ (fresh seed and error), as a replay check needs.
    again, _ = encrypt_rows(rows, secret, 2.0**17, workers=1)
    assert again[0] != blocks[0]


def test_sum_of_seeded_updates_is_exact_and_the_aggregate_is_full_size(contexts) -> None:
    secret, public = contexts
    packing = Packing(max_sites=8, spill_bits=2)
    rng = np.random.default_rng(4)
    deltas = [{"w": rng.uniform(-0.5, 0.5, 9000)} for _ in range(8)]
    layout = Layout.from_state_dict(deltas[0])
    total = EncryptedSum(ExpectedReply.build(public, packing, layout))
    quantised = []
    for i, delta in enumerate(deltas):
        enc = encrypt_update(
            delta, 10_000, secret, packing, layout=layout, rng=np.random.default_rng(i)
        )
        assert all(len(b) < 34_000 for b in _blocks(enc))
        total.add(enc.arrays, enc.meta)
        q, _ = quantise(layout.flatten(delta), 1.0, packing, np.random.default_rng(i))
        quantised.append(q - packing.offset)
    arrays, meta = total.result()
    m = WireMeta.from_record(meta)
    assert all(len(b) > 65_000 for b in record_blocks(arrays, m.num_blocks, m.per_array))
    dec = decode_aggregate_full(arrays, meta, secret, layout=layout, packing=packing)
    assert np.array_equal(dec.field_sums, np.sum(quantised, axis=0))
    assert dec.contributors == 8 and dec.total_count == 80_000


def test_blocks_of_neither_size_are_refused(contexts) -> None:
    secret, public = contexts
    packing = Packing()
    delta = {"w": np.zeros(5000)}
    layout = Layout.from_state_dict(delta)
    expected = ExpectedReply.build(public, packing, layout)
    assert 0 < expected.seeded_block_bytes < 0.51 * expected.block_bytes
    enc = encrypt_update(delta, 10, secret, packing, layout=layout)
    blocks = _blocks(enc)
    cut = [blocks[0][: len(blocks[0]) - 500], *blocks[1:]]
    arrays = blocks_to_record(cut, WireMeta.from_record(enc.meta).per_array)
    with pytest.raises(ReplyRejected, match="bytes"):
        EncryptedSum(expected).add(arrays, enc.meta)


def test_public_key_encryption_when_seeded_is_switched_off(contexts, monkeypatch) -> None:
    secret, public = contexts
    monkeypatch.setenv(seeded.ENV_SEEDED, "0")
    assert not seeded.encryptor_for(secret).seeded
    rows = [np.arange(4095, dtype=np.float64)]  # odd: the last slot's imaginary part pads
    blocks, _ = encrypt_rows(rows, secret, 2.0**17, workers=1)
    assert len(blocks[0]) > 65_000
    back, _ = decrypt_blocks(blocks, secret, workers=1)
    assert back[0].shape == (4096,) and np.array_equal(np.rint(back[0][:-1]), rows[0])


def test_seeded_encryption_is_faster(contexts) -> None:
    """Measured on the 2-core box: ~0.57 ms a block seeded against ~1.2 ms with the public key
    (encode, encrypt, serialize). Asserted loosely: a shared box is noisy."""
    secret, _ = contexts
    rows = [np.random.default_rng(0).integers(0, 2**40, 2048).astype(np.float64)] * 8
    encrypt_rows(rows[:1], secret, 2.0**17, workers=1)

    def cpu(fn) -> float:
        start = time.process_time()
        for _ in range(3):
            fn()
        return time.process_time() - start

    fast = cpu(lambda: encrypt_rows(rows, secret, 2.0**17, workers=1))
    slow = cpu(
        lambda: [ts.ckks_vector(secret, r.tolist(), scale=2.0**17).serialize() for r in rows]
    )
    assert fast < slow, (fast, slow)
