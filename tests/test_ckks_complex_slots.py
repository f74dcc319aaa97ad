"""Two slot integers per CKKS slot (wire format 4, issue 14): real and imaginary parts.

Real TenSEAL/SEAL keys: sites encrypt, the coordinator adds under the public context only, a
site decrypts. The imaginary parts must sum as exactly as the real parts, a damaged padding
slot must be refused, and an aggregate stored by format 3 (one integer per CKKS slot) must
still decode.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from fedcl.privacy.ckks.codec import MAX_FRACTION, Layout, Packing, quantise, slot_vector
from fedcl.privacy.ckks.complex_slots import complex_size, from_complex, to_complex
from fedcl.privacy.ckks.errors import AggregateIntegrityError
from fedcl.privacy.ckks.integrity import checksum_key
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.meta import FORMAT, SLOTS
from fedcl.privacy.ckks.parallel import decrypt_blocks, encrypt_rows
from fedcl.privacy.ckks.params import CKKSParams
from fedcl.privacy.ckks.wire import (
    EncryptedSum,
    ExpectedReply,
    WireMeta,
    blocks_per_array,
    blocks_to_record,
    decode_aggregate_full,
    encrypt_update,
    record_blocks,
)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory):
    files = init_keys(tmp_path_factory.mktemp("keys"))
    return load_secret_context(files.secret), load_public_context(files.public)


def test_interleaving_round_trips_and_pads_an_odd_row() -> None:
    row = np.arange(7, dtype=np.float64)
    packed = to_complex(row)
    assert complex_size(7) == packed.shape[0] == 4
    assert packed.tolist() == [0 + 1j, 2 + 3j, 4 + 5j, 6 + 0j]
    assert np.array_equal(from_complex(packed), np.append(row, 0.0))


def test_imaginary_parts_sum_as_exactly_as_real_parts(contexts) -> None:
    """8 sites' slot integers as large as the packing allows, summed under the public context:
    every position, even (real) and odd (imaginary), decrypts to the exact integer sum."""
    secret, public = contexts
    packing = Packing(max_sites=8)
    scale = float(2 ** packing.scale_bits(CKKSParams()))
    rng = np.random.default_rng(3)
    top = 2**packing.slot_bits // packing.max_sites
    rows = [rng.integers(0, top, 4096).astype(np.float64) for _ in range(8)]
    total = None
    for row in rows:
        (block,), _ = encrypt_rows([row], secret, scale, workers=1)
        vec = ts.ckks_vector_from(public, block)
        total = vec if total is None else total + vec
    (back,), _ = decrypt_blocks([total.serialize()], secret, workers=1)
    exact = np.sum(rows, axis=0)
    assert back.shape == (4096,)
    assert np.array_equal(np.rint(back), exact)
    worst_real = np.max(np.abs(back[0::2] - exact[0::2]))
    worst_imag = np.max(np.abs(back[1::2] - exact[1::2]))
    assert worst_imag < 0.25 * MAX_FRACTION and worst_real < 0.25 * MAX_FRACTION
    # TenSEAL's own decryption sees only the real parts: half of what the block holds.
    real = np.asarray(ts.ckks_vector_from(secret, total.serialize()).decrypt())
    assert real.shape == (2048,) and np.array_equal(np.rint(real), exact[0::2])


def _odd_update(secret, public):
    packing = Packing(max_sites=4)
    delta = {
        "w": np.random.default_rng(8).uniform(-0.4, 0.4, 9001)
    }  # 4,505 slot integers: 2 blocks
    layout = Layout.from_state_dict(delta)
    assert packing.slots_needed(layout.num_values) % 2 == 1  # the last CKKS slot is half used
    expected = ExpectedReply.build(public, packing, layout)
    enc = encrypt_update(delta, 50, secret, packing, layout=layout, rng=np.random.default_rng(1))
    return packing, layout, expected, enc, delta


def test_an_odd_update_decodes_and_a_damaged_padding_slot_is_refused(contexts) -> None:
    secret, public = contexts
    packing, layout, expected, enc, delta = _odd_update(secret, public)
    total = EncryptedSum(expected)
    total.add(enc.arrays, enc.meta)
    arrays, meta = total.result()
    dec = decode_aggregate_full(arrays, meta, secret, layout=layout, packing=packing)
    q, _ = quantise(
        layout.flatten(delta), 50 / packing.max_examples, packing, np.random.default_rng(1)
    )
    assert np.array_equal(dec.field_sums, q - packing.offset)
    # One more integer in the padding (the last block's last imaginary part) is corrupt.
    m = WireMeta.from_record(meta)
    blocks = record_blocks(arrays, m.num_blocks, m.per_array)
    last = ts.ckks_vector_from(secret, blocks[-1])
    offset = np.zeros(2 * last.size())
    offset[-1] = 1.0
    (extra,), _ = encrypt_rows([offset], secret, 2.0**m.scale_bits, workers=1)
    damaged = [*blocks[:-1], (last + ts.ckks_vector_from(secret, extra)).serialize()]
    with pytest.raises(AggregateIntegrityError, match="padding slot"):
        decode_aggregate_full(
            blocks_to_record(damaged, m.per_array), meta, secret, layout=layout, packing=packing
        )


def test_a_format_3_aggregate_with_one_integer_per_slot_still_decodes(contexts) -> None:
    """Stored model versions written before format 4: N/2 integers a block, real parts only."""
    secret, public = contexts
    packing = Packing(max_sites=4)
    delta = {"w": np.random.default_rng(2).uniform(-0.4, 0.4, 5000)}
    layout = Layout.from_state_dict(delta)
    params = CKKSParams()
    slots, _, _ = slot_vector(
        delta, 30, packing, layout, np.random.default_rng(0), key=checksum_key(secret)
    )
    scale = float(2 ** packing.scale_bits(params))
    rows = [slots[i : i + params.slots] for i in range(0, slots.shape[0], params.slots)]
    blocks = [ts.ckks_vector(public, r.tolist(), scale=scale).serialize() for r in rows]
    meta = WireMeta(
        kind="aggregate",
        fingerprint=ExpectedReply.build(public, packing, layout).fingerprint,
        layout_hash=layout.hash,
        num_values=layout.num_values,
        num_blocks=len(blocks),
        slots=params.slots,
        packing=packing,
        scale_bits=packing.scale_bits(params),
        per_array=blocks_per_array(params),
        summed=1,
    ).to_dict()
    meta[FORMAT] = 3
    assert meta[SLOTS] == 2048 and len(blocks) == 2  # 1 block in format 4
    dec = decode_aggregate_full(
        blocks_to_record(blocks, blocks_per_array(params)),
        meta,
        secret,
        layout=layout,
        packing=packing,
    )
    q, _ = quantise(
        layout.flatten(delta), 30 / packing.max_examples, packing, np.random.default_rng(0)
    )
    assert np.array_equal(dec.field_sums, q - packing.offset) and dec.total_count == 30
