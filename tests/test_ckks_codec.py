"""CKKS codec: exact encrypted sums of quantised updates, headroom, FedAvg error bound, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcl.config import ConfigError
from fedcl.config.experiment import ExperimentConfig, HESpec
from fedcl.models import state_sha256
from fedcl.privacy.ckks import check_packing, codec, packing_for, parallel
from fedcl.privacy.ckks.codec import HEADER_SLOTS, Layout, Packing, quantise
from fedcl.privacy.ckks.errors import CKKSConfigError, UpdateError
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.params import CKKSParams
from fedcl.privacy.ckks.wire import (
    EncryptedSum,
    ExpectedReply,
    decode_aggregate,
    decode_aggregate_full,
    encrypt_update,
)

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 300), "fc.bias": (10,)}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory):
    files = init_keys(tmp_path_factory.mktemp("keys"))
    return load_secret_context(files.secret), load_public_context(files.public)


def site_updates(num_sites: int, seed: int = 0, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    deltas = [
        {k: rng.normal(0.0, scale, s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(num_sites)
    ]
    counts = [int(n) for n in rng.integers(20, 5000, num_sites)]
    return deltas, counts


def run_round(contexts, packing: Packing, deltas, counts, seed: int = 100):
    """Encrypt at each site, sum at the coordinator (public context), decode at a site."""
    secret, public = contexts
    layout = Layout.from_state_dict(deltas[0])
    total = EncryptedSum(ExpectedReply.build(public, packing, layout))
    quantised = []
    for i, (delta, n) in enumerate(zip(deltas, counts, strict=True)):
        enc = encrypt_update(
            delta, n, secret, packing, layout=layout, rng=np.random.default_rng(seed + i)
        )
        total.add(enc.arrays, enc.meta)
        weight = min(n, packing.max_examples) / packing.max_examples
        q, _ = quantise(layout.flatten(delta), weight, packing, np.random.default_rng(seed + i))
        quantised.append(q - packing.offset)
    arrays, meta = total.result()
    return layout, quantised, decode_aggregate_full(arrays, meta, secret, layout=layout)


@pytest.mark.parametrize("num_sites", [2, 5, 20])
def test_encrypted_sum_is_exact_and_average_within_bound(contexts, num_sites: int) -> None:
    packing = Packing(max_sites=20)
    deltas, counts = site_updates(num_sites, seed=num_sites)
    layout, quantised, dec = run_round(contexts, packing, deltas, counts)
    # The decrypted sum is exactly the sum of the sites' quantised integers...
    assert np.array_equal(dec.field_sums, np.sum(quantised, axis=0))
    assert dec.contributors == num_sites and dec.total_count == sum(counts)
    # ...and the dequantised average is within the quantiser's bound of float FedAvg.
    exact = sum(n * layout.flatten(d) for d, n in zip(deltas, counts, strict=True)) / sum(counts)
    got = np.concatenate([dec.mean[name].reshape(-1) for name in layout.names])
    bound = packing.error_bound(num_sites, sum(counts))
    assert np.max(np.abs(got - exact)) <= bound
    assert set(dec.mean) == set(SHAPES) and dec.mean["fc.weight"].shape == (10, 300)


@pytest.mark.parametrize(("values_per_slot", "bits"), [(1, 20), (3, 8)])
def test_other_packings_are_exact(contexts, values_per_slot: int, bits: int) -> None:
    packing = Packing(bits=bits, values_per_slot=values_per_slot, max_sites=20)
    deltas, counts = site_updates(3, seed=7)
    _, quantised, dec = run_round(contexts, packing, deltas, counts)
    assert np.array_equal(dec.field_sums, np.sum(quantised, axis=0))


def test_headroom_grows_with_the_number_of_sites() -> None:
    rooms = [Packing(max_sites=k).headroom_bits for k in (1, 2, 5, 20, 32, 33, 100)]
    assert rooms == [0, 1, 3, 5, 5, 6, 7]
    fields = [Packing(max_sites=k).field_bits for k in (2, 5, 20)]
    assert fields == sorted(fields) and fields[0] < fields[-1]
    params = CKKSParams()
    # More sites need more headroom and a larger scale: the scale left over shrinks.
    assert Packing(max_sites=2).scale_bits(params) > Packing(max_sites=20).scale_bits(params)


def test_too_many_sites_for_the_packing_is_a_config_error() -> None:
    params = CKKSParams()
    assert Packing(max_sites=20).scale_bits(params) == 18  # the verified probe configuration
    assert Packing().max_sites_for(params) == 32
    with pytest.raises(CKKSConfigError, match=r"he\.max_sites = 40 .*at most 32 sites"):
        Packing(max_sites=40).scale_bits(params)
    with pytest.raises(CKKSConfigError, match="he.max_sites"):
        Packing(bits=15, values_per_slot=3, max_sites=20).scale_bits(params)
    assert Packing(bits=8, values_per_slot=3, max_sites=20).scale_bits(params) >= 18
    with pytest.raises(ConfigError, match="max_sites"):
        check_packing(HESpec(enabled=True, max_sites=1000, values_per_slot=2))
    assert HESpec(enabled=False, max_sites=1000).max_sites == 1000  # only checked when on
    assert packing_for(HESpec(enabled=True, clip=0.5, max_sites=20)) == Packing()
    # Unset values_per_slot: the densest packing that sums the round exactly (4x fp32 up to 32
    # sites, 8x beyond); unset max_sites: the round's size, from the experiment.
    assert packing_for(HESpec(enabled=True, max_sites=32)).values_per_slot == 2
    assert packing_for(HESpec(enabled=True, max_sites=100)).values_per_slot == 1
    big = ExperimentConfig.model_validate(
        {"simulation": {"num_sites": 1000}, "strategy": {"fraction_train": 0.1}}
    )
    assert big.he.max_sites == 100 and "max_sites" not in big.he.model_fields_set
    with pytest.raises(ValueError, match="fingerprint"):
        HESpec(fingerprint="not-a-sha256")


def test_nan_or_inf_is_refused_before_encryption(contexts, monkeypatch) -> None:
    secret, _ = contexts
    deltas, _ = site_updates(1)
    delta = dict(deltas[0])
    delta["fc.bias"] = delta["fc.bias"].copy()
    delta["fc.bias"][3] = np.inf
    delta["conv.bias"] = delta["conv.bias"].copy()
    delta["conv.bias"][0] = np.nan

    def never(*args, **kwargs):
        raise AssertionError("encrypted an update with NaN/inf")

    monkeypatch.setattr(parallel, "encrypt_rows", never)
    with pytest.raises(UpdateError, match="'conv.bias' has 1 NaN/inf"):
        encrypt_update(delta, 10, secret, Packing())
    delta["conv.bias"][0] = 0.0
    with pytest.raises(UpdateError, match="'fc.bias'"):
        encrypt_update(delta, 10, secret, Packing())


def test_clipping_is_counted_and_weights_are_capped(contexts) -> None:
    packing = Packing(clip=0.1, max_examples=1000)
    deltas, _ = site_updates(2, scale=0.2)
    secret, _ = contexts
    enc = encrypt_update(deltas[0], 50, secret, packing)
    expected = sum(int(np.count_nonzero(np.abs(v) > 0.1)) for v in deltas[0].values())
    assert enc.stats.clipped == expected > 0
    assert 0 < enc.stats.clipped_fraction < 1
    assert set(enc.stats.metrics()) == {"ckks-clipped-fraction", "ckks-encrypt-seconds"}
    # A site above max_examples is weighted as max_examples (and its count slot says so).
    deltas, _ = site_updates(2, scale=0.01)
    _, _, dec = run_round(contexts, packing, deltas, [5000, 500])
    assert dec.total_count == 1500


def test_stochastic_rounding_is_unbiased() -> None:
    packing = Packing(bits=4, clip=1.0)  # step = 1/7: coarse, so bias would show
    value = np.full(200_000, 0.05)
    q, _ = quantise(value, 1.0, packing, np.random.default_rng(0))
    decoded = (q - packing.offset) * packing.step
    assert abs(decoded.mean() - 0.05) < 0.002
    assert set(np.unique(q - packing.offset)) == {0, 1}  # floor and ceil of 0.35 steps


def test_layout_hash_depends_on_names_shapes_dtypes_and_order() -> None:
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    base = Layout.from_state_dict(a).hash
    assert Layout.from_state_dict({k: v.numpy() for k, v in a.items()}).hash == base
    assert Layout.from_state_dict({"b": a["b"], "w": a["w"]}).hash != base
    assert Layout.from_state_dict({"w": torch.zeros(3, 2), "b": torch.zeros(3)}).hash != base
    assert Layout.from_state_dict({"w": a["w"].double(), "b": a["b"]}).hash != base
    assert Layout.from_state_dict({"w2": a["w"], "b": a["b"]}).hash != base
    with pytest.raises(UpdateError, match="shape"):
        Layout.from_state_dict(a).flatten({"w": torch.zeros(3, 2), "b": torch.zeros(3)})


def test_decoding_is_deterministic_and_hash_agrees(contexts) -> None:
    """Every site decodes the same aggregate to bit-identical weights, so their digests agree."""
    secret, public = contexts
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)) for _ in range(2)]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    layout = Layout.from_state_dict(states[0])
    packing = Packing(clip=1.0)  # covers Linear's initial weights (|w| <= 1/sqrt(fan_in))
    total = EncryptedSum(ExpectedReply.build(public, packing, layout))
    for i, (state, n) in enumerate(zip(states, (30, 10), strict=True)):
        enc = encrypt_update(state, n, secret, packing, layout=layout, rng=np.random.default_rng(i))
        total.add(enc.arrays, enc.meta)
    arrays, meta = total.result()

    def apply(like):  # what a site does with a decoded aggregate: the mean, cast like its model
        mean, _, _ = decode_aggregate(arrays, meta, secret, layout=layout, packing=packing)
        return {k: torch.from_numpy(np.asarray(mean[k])).to(v.dtype) for k, v in like.items()}

    one, two = apply(states[0]), apply(states[1])
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert state_sha256(one) == state_sha256(two) != state_sha256(states[0])
    exact = {k: (30 * states[0][k] + 10 * states[1][k]) / 40 for k in one}
    bound = packing.error_bound(2, 40) + 1e-6  # float32 cast
    assert all(torch.allclose(one[k], exact[k], atol=bound, rtol=0) for k in one)


def test_worker_processes_give_the_same_result(contexts, monkeypatch) -> None:
    secret, _ = contexts
    deltas, counts = site_updates(1, seed=3)
    packing = Packing()
    slots, _, _ = codec.slot_vector(
        deltas[0], counts[0], packing, Layout.from_state_dict(deltas[0]), np.random.default_rng(1)
    )
    rows = [slots[i : i + 512] for i in range(0, slots.shape[0], 512)]  # 4 small blocks
    blocks, used = parallel.encrypt_rows(rows, secret, 2.0**18, workers=2, min_blocks=1)
    assert used == 2
    back, used = parallel.decrypt_blocks(blocks, secret, workers=2, min_blocks=1)
    assert used == 2
    assert np.array_equal(np.rint(np.concatenate(back)), slots)
    local, used = parallel.decrypt_blocks(blocks, secret, workers=1)
    assert used == 1 and np.array_equal(np.rint(np.concatenate(local)), slots)
    assert slots[0] == 1 and slots[1] == counts[0] and HEADER_SLOTS == 2
    parallel.shutdown()


def test_decode_aggregate_returns_mean_count_and_contributors(contexts) -> None:
    secret, public = contexts
    deltas, counts = site_updates(3, seed=11)
    layout = Layout.from_state_dict(deltas[0])
    total = EncryptedSum(ExpectedReply.build(public, Packing(), layout))
    for d, n in zip(deltas, counts, strict=True):
        total.add(*encode_pair(secret, d, n, layout))
    mean, n_total, k = decode_aggregate(*total.result(), secret, layout=layout)
    assert (n_total, k) == (sum(counts), 3)
    assert mean["conv.weight"].shape == SHAPES["conv.weight"]


def encode_pair(secret, delta, n, layout):
    enc = encrypt_update(delta, n, secret, Packing(), layout=layout)
    return enc.arrays, enc.meta
