"""CKKS wire format: what a reply reveals, how bad replies and aggregates are refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedcl.privacy.ckks.codec import Layout, Packing
from fedcl.privacy.ckks.errors import AggregateError, ReplyRejected
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.wire import (
    BASE,
    SUMMED,
    EncryptedSum,
    ExpectedReply,
    WireMeta,
    aggregate_from_bytes,
    aggregate_to_bytes,
    blocks_to_record,
    decode_aggregate,
    decode_aggregate_full,
    encrypt_update,
    record_blocks,
)

COUNT = 1237  # an example count that must never appear in clear


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    files = init_keys(tmp_path_factory.mktemp("keys"))
    secret, public = load_secret_context(files.secret), load_public_context(files.public)
    rng = np.random.default_rng(0)
    delta = {"a": rng.normal(0, 0.02, (140, 60)), "b": rng.normal(0, 0.02, 9)}  # 2 blocks
    layout = Layout.from_state_dict(delta)
    expected = ExpectedReply.build(public, Packing(), layout)
    return secret, public, delta, layout, expected


def site_reply(delta, num_examples, ctx, packing, **kwargs) -> tuple[ArrayRecord, ConfigRecord]:
    """(blocks, metadata) of a site's reply, as the site sends them."""
    enc = encrypt_update(delta, num_examples, ctx, packing, **kwargs)
    return enc.arrays, enc.meta


def validate(arrays, meta, expected: ExpectedReply) -> None:
    """What the coordinator does with a reply: validate it fully before adding it to a sum."""
    EncryptedSum(expected).add(arrays, meta)


def _blocks(arrays: ArrayRecord, meta: ConfigRecord) -> list[bytes]:
    m = WireMeta.from_record(meta)
    return record_blocks(arrays, m.num_blocks, m.per_array)


def _with_blocks(blocks: list[bytes], meta: ConfigRecord) -> ArrayRecord:
    return blocks_to_record(blocks, WireMeta.from_record(meta).per_array)


def _swap_block(arrays: ArrayRecord, meta: ConfigRecord, index: int, data: bytes) -> ArrayRecord:
    blocks = _blocks(arrays, meta)
    blocks[index] = data
    return _with_blocks(blocks, meta)


def test_example_counts_never_appear_in_clear(setup) -> None:
    secret, _, delta, layout, expected = setup
    arrays, meta = site_reply(delta, COUNT, secret, Packing(), layout=layout)
    assert all(k.startswith("ckks-") and k[5:].isdigit() for k in arrays)
    assert all(arrays[k].stype == "ckks" and arrays[k].dtype == "uint8" for k in arrays)
    for key, value in meta.items():
        assert "example" not in key or key == "ckks-max-examples"
        assert "num" not in key and value != COUNT and str(COUNT) not in str(value)
    total = EncryptedSum(expected)
    total.add(arrays, meta)
    agg_arrays, agg_meta = total.result()
    assert all(v != COUNT and str(COUNT) not in str(v) for v in agg_meta.values())
    _, n, k = decode_aggregate(agg_arrays, agg_meta, secret, layout=layout)
    assert (n, k) == (COUNT, 1)  # only the sites learn it, after decryption


def test_each_kind_of_bad_reply_is_rejected_with_its_reason(setup, tmp_path) -> None:
    secret, _, delta, layout, expected = setup
    arrays, meta = site_reply(delta, 10, secret, Packing(), layout=layout)
    validate(arrays, meta, expected)  # the good one passes

    def rejected(a, m) -> str:
        with pytest.raises(ReplyRejected) as err:
            validate(a, m, expected)
        return err.value.reason

    other = load_secret_context(init_keys(tmp_path / "other").secret)
    assert "fingerprint" in rejected(*site_reply(delta, 10, other, Packing(), layout=layout))
    wrong_layout = {"a": delta["a"], "c": delta["b"]}
    assert "layout" in rejected(*site_reply(wrong_layout, 10, secret, Packing()))
    assert "packing" in rejected(*site_reply(delta, 10, secret, Packing(clip=1.0)))
    assert "metadata" in rejected(arrays, None)
    blocks = _blocks(arrays, meta)
    assert len(blocks) == 2 and len(arrays) == 1  # two ciphertexts framed in one Array
    garbage = bytes(np.random.default_rng(1).integers(0, 256, len(blocks[0]), np.uint8))
    assert "deserialize under the public context" in rejected(
        _swap_block(arrays, meta, 0, garbage), meta
    )
    assert "bytes" in rejected(_swap_block(arrays, meta, 1, blocks[1][:-200]), meta)
    swapped = _with_blocks([blocks[1], blocks[0]], meta)
    assert "slot" in rejected(swapped, meta)  # block 1 is shorter: sizes do not match
    assert "holds 1 blocks" in rejected(_with_blocks(blocks[:1], meta), meta)
    truncated = Array(
        dtype="uint8", shape=(1000,), stype="ckks", data=arrays["ckks-000000"].data[:1000]
    )
    assert "truncated" in rejected(ArrayRecord({"ckks-000000": truncated}), meta)
    extra = ArrayRecord({**{k: arrays[k] for k in arrays}, "ckks-000001": arrays["ckks-000000"]})
    assert "array entries" in rejected(extra, meta)
    bad_count = ConfigRecord({**dict(meta), "ckks-blocks": 3})
    assert "blocks" in rejected(arrays, bad_count)
    wrong_base = expected.with_base("f" * 64)
    with pytest.raises(ReplyRejected, match="trained from model"):
        validate(arrays, meta, wrong_base)


def test_sum_is_capped_at_max_sites(setup) -> None:
    secret, public, delta, layout, _ = setup
    packing = Packing(max_sites=2)
    total = EncryptedSum(ExpectedReply.build(public, packing, layout))
    reply = site_reply(delta, 10, secret, packing, layout=layout)
    total.add(*reply)
    with pytest.raises(ReplyRejected, match="replay"):
        total.add(*reply)  # identical ciphertexts would add their noise linearly
    total.add(*site_reply(delta, 10, secret, packing, layout=layout))
    with pytest.raises(ReplyRejected, match="max_sites"):
        total.add(*site_reply(delta, 10, secret, packing, layout=layout))


def test_site_refuses_a_corrupt_or_tampered_aggregate(setup) -> None:
    secret, public, delta, layout, expected = setup
    total = EncryptedSum(expected)
    for n in (10, 20):
        total.add(*site_reply(delta, n, secret, Packing(), layout=layout))
    arrays, meta = total.result()
    mean, n, k = decode_aggregate(arrays, meta, secret, layout=layout)
    assert (n, k) == (30, 2)
    assert np.allclose(mean["a"], delta["a"], atol=Packing().error_bound(2, 30))

    lied = ConfigRecord({**dict(meta), SUMMED: 3})
    with pytest.raises(AggregateError, match="3"):
        decode_aggregate(arrays, lied, secret, layout=layout)
    block = bytearray(_blocks(arrays, meta)[0])
    mid = len(block) // 2
    block[mid : mid + 16] = bytes(b ^ 0x5A for b in block[mid : mid + 16])
    corrupt = _swap_block(arrays, meta, 0, bytes(block))
    with pytest.raises(AggregateError):
        decode_aggregate(corrupt, meta, secret, layout=layout)
    other_layout = Layout.from_state_dict({"a": delta["a"]})
    with pytest.raises(AggregateError, match="layout"):
        decode_aggregate(arrays, meta, secret, layout=other_layout)
    with pytest.raises(AggregateError, match="packing"):
        decode_aggregate(arrays, meta, secret, layout=layout, packing=Packing(bits=14))
    reply_arrays, reply_meta = site_reply(delta, 10, secret, Packing(), layout=layout)
    with pytest.raises(AggregateError, match="aggregate"):
        decode_aggregate(reply_arrays, reply_meta, secret, layout=layout)


def test_stored_model_version_round_trips(setup) -> None:
    secret, public, delta, layout, expected = setup
    total = EncryptedSum(expected.with_base("a" * 64))
    total.add(*site_reply(delta, 7, secret, Packing(), layout=layout, base_sha256="a" * 64))
    arrays, meta = total.result()
    payload = aggregate_to_bytes(arrays, meta)
    arrays2, meta2 = aggregate_from_bytes(payload)
    assert dict(meta2) == dict(meta) and meta2[BASE] == "a" * 64
    assert _blocks(arrays2, meta2) == _blocks(arrays, meta)
    with pytest.raises(ValueError, match="truncated"):
        aggregate_from_bytes(payload[:-5])
    dec = decode_aggregate_full(arrays2, meta2, secret, layout=layout)
    assert dec.contributors == 1 and dec.total_count == 7


def test_encrypted_sum_adds_block_wise(setup) -> None:
    """The sum of two replies decodes to the sum of what each one decodes to, exactly."""
    secret, _, delta, layout, expected = setup
    replies = [site_reply(delta, n, secret, Packing(), layout=layout) for n in (3, 4)]
    singles = []
    for reply in replies:
        one = EncryptedSum(expected)
        one.add(*reply)
        singles.append(decode_aggregate_full(*one.result(), secret, layout=layout))
    total = EncryptedSum(expected)
    for reply in replies:
        total.add(*reply)
    both = decode_aggregate_full(*total.result(), secret, layout=layout)
    assert np.array_equal(both.field_sums, singles[0].field_sums + singles[1].field_sums)
    assert both.total_count == 7 and both.contributors == 2
