"""The checksum inside each update: a corrupt aggregate is named, and its culprit found (issue 11).

Every stochastic rounding is seeded (``rng=np.random.default_rng(i)``); keys are fresh per
module, so a test never depends on which key set it got.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from flwr.app import ConfigRecord

from fedcl.privacy.ckks import codec
from fedcl.privacy.ckks.culprit import verifier_for
from fedcl.privacy.ckks.errors import (
    AggregateError,
    AggregateIntegrityError,
    CKKSKeyError,
    GroupTooSmall,
    ReplyRejected,
)
from fedcl.privacy.ckks.groups import group_sum, recover_aggregate, verify_group_sum
from fedcl.privacy.ckks.integrity import UNKEYED, checksum_key
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.layout import Layout
from fedcl.privacy.ckks.packing import HEADER_SLOTS, Packing
from fedcl.privacy.ckks.parallel import encrypt_rows
from fedcl.privacy.ckks.params import CKKSParams
from fedcl.privacy.ckks.wire import (
    FORMAT,
    FORMAT_VERSION,
    EncryptedSum,
    ExpectedReply,
    WireMeta,
    aggregate_from_bytes,
    aggregate_to_bytes,
    blocks_to_record,
    decode_aggregate_full,
    encrypt_update,
    record_blocks,
)

SHAPES = {"a": (70, 60), "b": (9,)}  # 4,209 values: two ciphertext blocks
COUNTS = [120, 300, 80, 500, 250]
SITES = [f"site-{i}" for i in range(len(COUNTS))]
PACKING = Packing(max_sites=8)
SCALE_BITS = PACKING.scale_bits(CKKSParams())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    files = init_keys(tmp_path_factory.mktemp("keys"))
    secret, public = load_secret_context(files.secret), load_public_context(files.public)
    rng = np.random.default_rng(7)
    deltas = [{k: rng.normal(0, 0.05, s) for k, s in SHAPES.items()} for _ in SITES]
    layout = Layout.from_state_dict(deltas[0])
    expected = ExpectedReply.build(public, PACKING, layout)
    replies = {}
    for i, (site, delta, n) in enumerate(zip(SITES, deltas, COUNTS, strict=True)):
        enc = encrypt_update(delta, n, secret, PACKING, layout=layout, rng=np.random.default_rng(i))
        replies[site] = (enc.arrays, enc.meta)
    return secret, public, layout, expected, deltas, replies


def blocks_of(reply) -> list[bytes]:
    arrays, meta = reply
    m = WireMeta.from_record(meta)
    return record_blocks(arrays, m.num_blocks, m.per_array)


def with_block(reply, index: int, data: bytes):
    blocks = blocks_of(reply)
    blocks[index] = data
    return blocks_to_record(blocks, WireMeta.from_record(reply[1]).per_array), reply[1]


def flip_a_bit_mid_ciphertext(reply, expected: ExpectedReply):
    """One bit flipped in the middle of block 0, at the first byte from the middle where the
    result still passes the coordinator's validation (a flip in a coefficient's top bits can
    make it exceed the modulus, which SEAL refuses on loading: that one *is* caught)."""
    block = blocks_of(reply)[0]
    for pos in range(len(block) // 2, len(block) // 2 + 16):
        flipped = bytearray(block)
        flipped[pos] ^= 0x01
        candidate = with_block(reply, 0, bytes(flipped))
        try:
            EncryptedSum(expected).add(*candidate)
        except ReplyRejected:
            continue
        return candidate
    raise AssertionError("every bit flip near the middle was rejected")


def add_integers(reply, secret, slot: int, amount: float = 1.0):
    """A faulty site whose plaintext was off by an integer in one slot: decrypts cleanly.

    Two slot integers share a CKKS slot (real, imaginary), which TenSEAL's plaintext addition
    cannot reach, so the offset is encrypted and added (one more fresh noise term).
    """
    vec = ts.ckks_vector_from(secret, blocks_of(reply)[0])
    offset = np.zeros(2 * vec.size())
    offset[slot] = amount
    (extra,), _ = encrypt_rows([offset], secret, 2.0**SCALE_BITS, workers=1)
    return with_block(reply, 0, (vec + ts.ckks_vector_from(secret, extra)).serialize())


def total_of(expected, replies, sites=SITES):
    total = EncryptedSum(expected)
    for site in sites:
        total.add(*replies[site])  # every reply passes validation, the damaged one included
    return total.result()


def weighted_mean(deltas, layout, indices):
    n = sum(COUNTS[i] for i in indices)
    return sum(COUNTS[i] * layout.flatten(deltas[i]) for i in indices) / n, n


def test_an_intact_aggregate_verifies(fed) -> None:
    secret, _, layout, expected, deltas, replies = fed
    dec = decode_aggregate_full(*total_of(expected, replies), secret, layout=layout)
    exact, n = weighted_mean(deltas, layout, range(len(SITES)))
    got = np.concatenate([dec.mean[k].reshape(-1) for k in layout.names])
    assert dec.contributors == len(SITES) and dec.total_count == n
    assert np.max(np.abs(got - exact)) <= PACKING.error_bound(len(SITES), n)


def test_a_bit_flipped_mid_ciphertext_passes_validation_and_is_caught_after_decryption(
    fed,
) -> None:
    secret, _, layout, expected, _, replies = fed
    damaged = dict(replies)
    damaged["site-2"] = flip_a_bit_mid_ciphertext(replies["site-2"], expected)
    with pytest.raises(AggregateIntegrityError, match="the aggregate is corrupt"):
        decode_aggregate_full(*total_of(expected, damaged), secret, layout=layout)


def test_integer_damage_is_caught_by_the_checksum(fed) -> None:
    """Damage that decrypts to clean integers: only the checksum sees it (the check done by
    hand: with ``integrity.verify`` disabled, this aggregate decodes to a wrong mean)."""
    secret, _, layout, expected, _, replies = fed
    for slot in (0, 1, HEADER_SLOTS + 700, 2047):  # contributor count, example count, values
        damaged = dict(replies)
        damaged["site-4"] = add_integers(replies["site-4"], secret, slot)
        with pytest.raises(AggregateIntegrityError, match="checksums do not match"):
            decode_aggregate_full(*total_of(expected, damaged), secret, layout=layout)


@pytest.mark.parametrize("damage", ["bit flip", "integer"])
def test_the_culprit_is_found_without_any_group_below_two_and_the_rest_is_their_mean(
    fed, damage: str
) -> None:
    secret, _, layout, expected, deltas, replies = fed
    culprit = "site-3"
    damaged = dict(replies)
    damaged[culprit] = (
        flip_a_bit_mid_ciphertext(replies[culprit], expected)
        if damage == "bit flip"
        else add_integers(replies[culprit], secret, HEADER_SLOTS + 5)
    )
    asked: list[tuple[tuple[str, ...], str, int]] = []

    def verify(group, arrays, meta) -> bool:  # the Flower round trip to a verifying site
        verifier = verifier_for(group, SITES, turn=len(asked))
        assert verifier is not None and verifier not in group
        asked.append((group, verifier, int(meta["ckks-summed"])))
        return verify_group_sum(arrays, meta, secret, layout=layout, min_group_size=2)

    recovery = recover_aggregate(expected, damaged, verify, min_group_size=2)
    search = recovery.search
    assert search.culprits == (culprit,) and search.undetermined == ()
    assert search.honest == tuple(s for s in SITES if s != culprit)
    assert asked and all(len(g) >= 2 and summed == len(g) for g, _, summed in asked)
    assert search.oracle_calls == len(asked) <= 4  # ceil(log2 5) + 2 at most
    dec = decode_aggregate_full(recovery.arrays, recovery.meta, secret, layout=layout)
    honest = [SITES.index(s) for s in search.honest]
    exact, n = weighted_mean(deltas, layout, honest)
    got = np.concatenate([dec.mean[k].reshape(-1) for k in layout.names])
    assert dec.contributors == 4 and dec.total_count == n
    assert np.max(np.abs(got - exact)) <= PACKING.error_bound(4, n)


def test_no_group_below_the_minimum_is_summed_or_decrypted(fed, monkeypatch) -> None:
    secret, _, layout, expected, _, replies = fed
    with pytest.raises(GroupTooSmall, match="min_group_size is 2"):
        group_sum(expected, replies, ["site-0"], min_group_size=2)
    with pytest.raises(GroupTooSmall):
        group_sum(expected, replies, ["site-0", "site-0"], min_group_size=2)  # one site twice
    alone = total_of(expected, replies, ["site-1"])  # what a coordinator must not ask about
    from fedcl.privacy.ckks import parallel

    def never(*args, **kwargs):
        raise AssertionError("decrypted a sum of one site")

    monkeypatch.setattr(parallel, "decrypt_blocks", never)
    with pytest.raises(GroupTooSmall, match="refusing to decrypt a sum of 1 site"):
        verify_group_sum(*alone, secret, layout=layout, min_group_size=2)
    three = group_sum(expected, replies, SITES[:3], min_group_size=3)
    with pytest.raises(GroupTooSmall):
        verify_group_sum(*three, secret, layout=layout, min_group_size=4)


def test_a_protocol_mistake_is_not_a_failed_check(fed) -> None:
    secret, _, layout, expected, _, replies = fed
    arrays, meta = group_sum(expected, replies, SITES[:2], min_group_size=2)
    assert verify_group_sum(arrays, meta, secret, layout=layout, min_group_size=2) is True
    other = Layout.from_state_dict({"a": np.zeros(SHAPES["a"])})
    with pytest.raises(AggregateError, match="layout") as err:
        verify_group_sum(arrays, meta, secret, layout=other, min_group_size=2)
    assert not isinstance(err.value, AggregateIntegrityError)


def test_the_checksum_is_keyed_by_the_secret_key(fed, tmp_path) -> None:
    secret, public, layout, _, deltas, _ = fed
    other = load_secret_context(init_keys(tmp_path / "other").secret)
    assert checksum_key(secret) == checksum_key(secret) != checksum_key(other)
    with pytest.raises(CKKSKeyError, match="secret"):
        checksum_key(public)  # the coordinator cannot compute (or forge) a checksum
    with pytest.raises(CKKSKeyError):
        encrypt_update(deltas[0], 10, public, PACKING)
    slots, _, _ = codec.slot_vector(
        deltas[0], 10, PACKING, layout, np.random.default_rng(0), key=checksum_key(secret)
    )
    codec.decode_slots(slots, PACKING, layout, key=checksum_key(secret))
    with pytest.raises(AggregateIntegrityError):
        codec.decode_slots(slots, PACKING, layout, key=checksum_key(other))
    with pytest.raises(AggregateIntegrityError):
        codec.decode_slots(slots, PACKING, layout, key=UNKEYED)


def test_checksums_sum_exactly_at_max_sites_and_catch_any_one_field_error() -> None:
    """Plaintext slot arithmetic (no encryption): the sum of max_sites updates at the extremes
    of the quantiser still verifies, and an error of any size in any one value slot does not."""
    rng = np.random.default_rng(3)
    spill = Packing(max_sites=5, spill_bits=2)  # what packing_for picks for 5 sites
    for packing in (
        Packing(max_sites=20),
        Packing(bits=8, values_per_slot=3, max_sites=20),
        spill,
    ):
        layout = Layout.from_state_dict({"w": np.zeros((33, 31))})
        extremes = [np.full((33, 31), packing.clip * s) for s in (1, -1)]
        updates = [
            {"w": extremes[i % 2] if i < 4 else rng.uniform(-1, 1, (33, 31)) * packing.clip}
            for i in range(packing.max_sites)
        ]
        slots = sum(
            codec.slot_vector(u, packing.max_examples, packing, layout, rng, key=b"k")[0]
            for u in updates
        )
        dec = codec.decode_slots(slots, packing, layout, key=b"k")
        assert dec.contributors == packing.max_sites
        assert dec.total_count == packing.max_sites * packing.max_examples
        for pos in rng.choice(np.arange(HEADER_SLOTS, slots.shape[0]), 40, replace=False):
            for error in (1, -1, 2 ** int(rng.integers(1, packing.slot_bits - 1))):
                bad = slots.copy()
                bad[pos] += error
                with pytest.raises(AggregateIntegrityError):
                    codec.decode_slots(bad, packing, layout, key=b"k")


def test_checksum_costs_a_few_slots_and_no_block_for_the_default_model() -> None:
    """17,226 parameters (the default scenario's mlp) at the [he] defaults: 3 more slots, the
    same 3 blocks (two slot integers per CKKS slot), so the same bytes per parameter."""
    packing, params = Packing(clip=4.0), CKKSParams()
    n = 17_226
    assert packing.checksum_fields == 5 and packing.checksum_moduli[0] == 32749
    assert packing.slots_needed(n) - (HEADER_SLOTS + -(-n // 2)) == 3
    per = params.block_values
    assert packing.num_blocks(n, params) == -(-(HEADER_SLOTS + -(-n // 2)) // per) == 3


def test_wire_format_1_is_refused_with_a_clear_message(fed) -> None:
    secret, _, layout, expected, _, replies = fed
    arrays, meta = replies["site-0"]
    old = ConfigRecord({**dict(meta), FORMAT: 1})
    with pytest.raises(ReplyRejected, match="version 1 .*without the aggregate checksum"):
        EncryptedSum(expected).add(arrays, old)
    agg_arrays, agg_meta = total_of(expected, replies, SITES[:2])
    old_agg = ConfigRecord({**dict(agg_meta), FORMAT: 1})
    with pytest.raises(AggregateError, match="version 1"):
        decode_aggregate_full(agg_arrays, old_agg, secret, layout=layout)
    payload = aggregate_to_bytes(agg_arrays, agg_meta).replace(
        f'"ckks-format": {FORMAT_VERSION}'.encode(), b'"ckks-format": 1'
    )
    assert payload != aggregate_to_bytes(agg_arrays, agg_meta)
    with pytest.raises(ValueError, match="version 1"):
        aggregate_from_bytes(payload)
