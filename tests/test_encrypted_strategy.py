"""Encrypted(FedAvg/FedProx): the coordinator validates and adds ciphertexts, public key only."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcl.config import ConfigError
from fedcl.config import protocol as P
from fedcl.models import state_sha256
from fedcl.privacy.ckks.codec import Layout, Packing
from fedcl.privacy.ckks.errors import CKKSKeyError
from fedcl.privacy.ckks.keys import init_keys, load_public_context, load_secret_context
from fedcl.privacy.ckks.wire import (
    META_KEY,
    WireMeta,
    blocks_to_record,
    decode_aggregate_full,
    encrypt_update,
    record_blocks,
)
from fedcl.simulations.local_grid import LocalGrid
from fedcl.strategies import GlobalModel, SiteStrategy
from fedcl.strategies.encrypted import CONTRIBUTORS, Encrypted, is_encrypted

SHAPES = {"w": (40, 30), "b": (30,)}
BASE = "b" * 64
#: A round whose model only the sites can decrypt: the replies' majority is the reference.
UNKNOWN = GlobalModel(ArrayRecord(), meta=ConfigRecord({}))


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("keys")
    files, other = init_keys(root / "fed"), init_keys(root / "other")
    return files, load_secret_context(files.secret), load_secret_context(other.secret)


def deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.03, s) for k, s in SHAPES.items()} for _ in range(n)]


def reply(site: str, node: int, arrays: ArrayRecord, meta: ConfigRecord | None, loss: float):
    incoming = Message(
        RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    content = RecordDict(
        {
            P.ARRAYS: arrays,
            P.METRICS: MetricRecord({P.TRAIN_LOSS: loss}),
            P.SITE: ConfigRecord({P.SITE_ID: site, P.STATUS: P.STATUS_OK, P.DETAIL: ""}),
        }
    )
    if meta is not None:
        content[META_KEY] = meta
    return Message(content, reply_to=incoming)


def strategy(files, cls=FedAvg, **kwargs):
    layout = Layout.from_state_dict(deltas(1)[0])
    inner = SiteStrategy(
        cls(min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1, **kwargs),
        summable=True,
    )
    return Encrypted(
        inner,
        public_context=load_public_context(files.public),
        packing=Packing(max_sites=8),
        layout=layout,
    )


def test_bad_replies_are_dropped_and_the_others_summed(keys) -> None:
    files, secret, other = keys
    s = strategy(files)
    assert s.public_context.is_private() is False
    layout, packing = s.expected.layout_hash, s.expected.packing
    ups = deltas(5)
    counts = [100, 300, 50, 70, 80]

    def enc(i, ctx=secret, delta=None, base=BASE):
        return encrypt_update(
            delta or ups[i], counts[i], ctx, packing, base_sha256=base, rng=np.random.default_rng(i)
        )

    good = [enc(0), enc(1)]
    corrupt = enc(2)
    m = WireMeta.from_record(corrupt.meta)
    blocks = record_blocks(corrupt.arrays, m.num_blocks, m.per_array)
    blocks[0] = bytes(len(blocks[0]))  # zeros: not a ciphertext
    corrupt_arrays = blocks_to_record(blocks, m.per_array)
    wrong_key = enc(3, ctx=other)
    wrong_layout = enc(4, delta={"w": ups[4]["w"]})
    replies = [
        reply("site-a", 1, good[0].arrays, good[0].meta, 0.5),
        reply("site-corrupt", 2, corrupt_arrays, corrupt.meta, 9.0),
        reply("site-b", 3, good[1].arrays, good[1].meta, 0.7),
        reply("site-otherkey", 4, wrong_key.arrays, wrong_key.meta, 9.0),
        reply("site-model", 5, wrong_layout.arrays, wrong_layout.meta, 9.0),
        reply("site-plain", 6, ArrayRecord({"w": Array(np.zeros(3))}), None, 9.0),
    ]
    result = s.aggregate_train(1, replies, sent=UNKNOWN)
    arrays, metrics = result.model.arrays, result.metrics
    reasons = dict(result.rejections)
    assert set(reasons) == {"site-corrupt", "site-otherkey", "site-model", "site-plain"}
    assert "deserialize" in reasons["site-corrupt"]
    assert "fingerprint" in reasons["site-otherkey"]
    assert "layout" in reasons["site-model"]
    assert "metadata" in reasons["site-plain"]
    assert metrics[CONTRIBUTORS] == 2 and metrics[P.TRAIN_LOSS] == pytest.approx(0.6)
    assert P.NUM_EXAMPLES not in metrics
    assert is_encrypted(arrays) and result.model.encrypted
    assert {o.site_id for o in result.contributors} == {"site-a", "site-b"}

    # The sum of the two good sites is intact: decrypting (at a site) gives their FedAvg.
    lay = Layout.from_state_dict(ups[0])
    assert lay.hash == layout
    dec = decode_aggregate_full(arrays, result.model.meta, secret, layout=lay)
    assert (dec.contributors, dec.total_count) == (2, 400)
    exact = (100 * lay.flatten(ups[0]) + 300 * lay.flatten(ups[1])) / 400
    got = np.concatenate([dec.mean[k].reshape(-1) for k in lay.names])
    assert np.max(np.abs(got - exact)) <= packing.error_bound(2, 400)


def test_replies_from_another_model_are_rejected_by_majority(keys) -> None:
    files, secret, _ = keys
    s = strategy(files)
    ups = deltas(3, seed=1)
    replies = []
    for i, base in enumerate((BASE, "c" * 64, BASE)):  # site-1 trained from another model
        enc = encrypt_update(ups[i], 10, secret, s.expected.packing, base_sha256=base)
        replies.append(reply(f"site-{i}", i + 1, enc.arrays, enc.meta, 0.1))
    result = s.aggregate_train(2, replies, sent=UNKNOWN)  # no known base: the majority decides
    assert [site for site, _ in result.rejections] == ["site-1"]
    assert "trained from model" in result.rejections[0][1]
    meta = result.model.meta
    assert meta["ckks-base"] == BASE and meta["ckks-summed"] == 2
    # The coordinator knows the round's model (plaintext): all three disagree with it.
    known = GlobalModel(ArrayRecord({"w": Array(np.zeros(3))}))
    result = s.aggregate_train(3, replies, sent=known)
    assert result.model is None and result.metrics == {}
    assert len(result.rejections) == 3


def test_the_coordinator_refuses_a_secret_context(keys) -> None:
    files, secret, _ = keys
    with pytest.raises(CKKSKeyError, match="SECRET"):
        Encrypted(
            SiteStrategy(FedAvg(), summable=True),
            public_context=secret,
            packing=Packing(),
            layout=Layout.from_state_dict(deltas(1)[0]),
        )


def test_only_a_summable_strategy_can_be_encrypted(keys) -> None:
    files, _, _ = keys
    with pytest.raises(ConfigError, match="weighted sum"):
        Encrypted(
            SiteStrategy(FedAvg(), summable=False),
            public_context=load_public_context(files.public),
            packing=Packing(),
            layout=Layout.from_state_dict(deltas(1)[0]),
        )


def test_encrypted_arrays_are_sent_with_their_metadata(keys) -> None:
    files, secret, _ = keys
    s = strategy(files, cls=FedProx, proximal_mu=0.1)
    grid = LocalGrid(ClientApp(), 2)
    plain = GlobalModel(ArrayRecord({k: Array(np.zeros(v)) for k, v in SHAPES.items()}))
    msgs = list(s.configure_train(1, plain, ConfigRecord({}), grid))
    assert len(msgs) == 2 and all(META_KEY not in m.content for m in msgs)
    enc = encrypt_update(deltas(1)[0], 10, secret, s.expected.packing, base_sha256=BASE)
    model = s.aggregate_train(1, [reply("a", 1000, enc.arrays, enc.meta, 0.2)], sent=UNKNOWN).model
    for msgs in (
        s.configure_train(2, model, ConfigRecord({}), grid),
        s.configure_evaluate(2, model, ConfigRecord({}), grid),
    ):
        msgs = list(msgs)
        assert all(m.content[META_KEY]["ckks-kind"] == "aggregate" for m in msgs)
    assert msgs[0].content[P.CONFIG].get("proximal-mu") is None  # evaluate: no mu
    train = list(s.configure_train(3, model, ConfigRecord({}), grid))
    assert train[0].content[P.CONFIG]["proximal-mu"] == 0.1
    # e.g. a resumed coordinator that stored the blocks but lost their metadata
    with pytest.raises(ValueError, match="metadata"):
        s.configure_train(4, GlobalModel(model.arrays), ConfigRecord({}), grid)


def test_two_rounds_sites_agree_on_the_decrypted_model(keys) -> None:
    """The flow the ClientApp follows: decode, load, train, encrypt weights with the base's SHA."""
    import torch

    from fedcl.privacy.ckks.wire import decode_aggregate

    files, secret, _ = keys
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.GroupNorm(4, 16))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    layout = Layout.from_state_dict(initial)
    packing = Packing(max_sites=4)
    s = Encrypted(
        SiteStrategy(FedAvg(), summable=True),
        public_context=load_public_context(files.public),
        packing=packing,
        layout=layout,
    )
    sites = {f"site-{i}": {k: v.clone() for k, v in initial.items()} for i in range(3)}
    arrays = meta = None
    # Round 1: the plaintext initial model, whose hash the coordinator knows.
    sent = GlobalModel(ArrayRecord({k: v.clone() for k, v in initial.items()}))
    for server_round in (1, 2):
        replies = []
        for i, (name, state) in enumerate(sites.items()):
            if arrays is not None:  # decode the aggregate: the whole model, weighted mean
                mean, _, _ = decode_aggregate(arrays, meta, secret, layout=layout, packing=packing)
                state = sites[name] = {
                    k: torch.as_tensor(mean[k], dtype=torch.float32).reshape(v.shape)
                    for k, v in state.items()
                }
            trained = {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in state.items()}
            enc = encrypt_update(
                trained,
                100 * (i + 1),
                secret,
                packing,
                layout=layout,
                base_sha256=state_sha256(state),
            )
            replies.append(reply(name, i + 1, enc.arrays, enc.meta, 0.1))
        result = s.aggregate_train(server_round, replies, sent=sent)
        arrays, meta = result.model.arrays, result.model.meta
        assert result.rejections == [] and meta["ckks-summed"] == 3
        sent = result.model  # later rounds: the sites' majority (the coordinator cannot decrypt)
    applied = [decode_aggregate(arrays, meta, secret, layout=layout)[0] for _ in sites]
    digests = {
        state_sha256({k: torch.as_tensor(np.asarray(m[k])) for k in layout.names}) for m in applied
    }
    assert len(digests) == 1
