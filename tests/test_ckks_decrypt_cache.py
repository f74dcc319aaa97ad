"""A process that plays several sites decrypts each aggregate once (issue 14), and only that.

Real keys and the real site codec: five sites' seeded updates summed by the coordinator's
public context, then decoded by every site's :class:`CKKSCodec` in one process, with the
per-process cache of decrypted aggregates on and off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from fedcl.client import codec as site_codec
from fedcl.client.codec import CKKSCodec
from fedcl.config import SiteConfig
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.ckks import packing_for
from fedcl.privacy.ckks.errors import AggregateError, AggregateIntegrityError
from fedcl.privacy.ckks.keys import load_public_context
from fedcl.privacy.ckks.layout import Layout
from fedcl.privacy.ckks.wire import (
    EncryptedSum,
    ExpectedReply,
    WireMeta,
    blocks_to_record,
    record_blocks,
)
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import prepare_keys

SITES = 5


def _experiment(tmp: Path):
    _, exp = load_scenario("digits-domain-il", ["he.enabled=true", "seed=3"])
    return prepare_keys(exp, tmp)


def _codecs(exp, tmp: Path) -> list[CKKSCodec]:
    key = Path(exp.he.public_context).with_name("secret.ctx")
    return [
        CKKSCodec(exp, SiteConfig(site_id=f"site-{i}", state_dir=tmp / f"s{i}", key_path=key))
        for i in range(SITES)
    ]


def _aggregate(exp, codecs, like, server_round: int) -> RecordDict:
    """The coordinator's sum of every site's update of ``server_round`` (public key only)."""
    public = load_public_context(exp.he.public_context)
    total = EncryptedSum(
        ExpectedReply.build(public, packing_for(exp.he), Layout.from_state_dict(like))
    )
    for i, codec in enumerate(codecs):
        state = {k: v + 0.01 * (i + 1) * server_round for k, v in like.items()}
        records, _ = codec.encode_update(state, 50 + 10 * i, "", server_round)
        total.add(records[P.ARRAYS], records[P.meta_key(P.ARRAYS)])
    arrays, meta = total.result()
    return RecordDict({P.ARRAYS: arrays, P.meta_key(P.ARRAYS): meta})


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fed")
    exp = _experiment(tmp)
    like = RunPlan.of(exp).initial_model().state_dict()
    codecs = _codecs(exp, tmp)
    return exp, like, codecs, tmp


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(site_codec.ENV_DECRYPT_CACHE, raising=False)
    site_codec.clear_decrypt_cache()
    yield
    site_codec.clear_decrypt_cache()


def _stats() -> tuple[int, int]:
    return site_codec.DECRYPT_CACHE_STATS["hits"], site_codec.DECRYPT_CACHE_STATS["misses"]


def test_one_decryption_serves_every_site_bit_identically(federation, monkeypatch) -> None:
    exp, like, codecs, _ = federation
    content = _aggregate(exp, codecs, like, server_round=1)
    monkeypatch.setenv(site_codec.ENV_DECRYPT_CACHE, "0")
    hits0, misses0 = _stats()
    uncached = [c.decode(content, P.ARRAYS, like) for c in codecs]
    assert _stats() == (hits0, misses0)  # switched off: nothing counted, nothing kept
    monkeypatch.delenv(site_codec.ENV_DECRYPT_CACHE)
    cached = [c.decode(content, P.ARRAYS, like) for c in codecs]
    hits, misses = _stats()
    assert (hits - hits0, misses - misses0) == (SITES - 1, 1)
    for plain, served in zip(uncached, cached, strict=True):
        assert plain.keys() == served.keys()
        for k in plain:
            assert plain[k].dtype == served[k].dtype and plain[k].shape == served[k].shape
            assert torch.equal(plain[k], served[k])  # bit-identical, not merely close
    # Each site gets its own tensors: training one site's copy in place leaves the others'.
    name = next(iter(cached[0]))
    cached[0][name].add_(1.0)
    again = codecs[1].decode(content, P.ARRAYS, like)
    assert torch.equal(again[name], uncached[1][name])


def test_another_round_is_decrypted_afresh(federation) -> None:
    exp, like, codecs, _ = federation
    first = codecs[0].decode(_aggregate(exp, codecs, like, server_round=2), P.ARRAYS, like)
    hits, misses = _stats()
    second = codecs[0].decode(_aggregate(exp, codecs, like, server_round=3), P.ARRAYS, like)
    assert _stats() == (hits, misses + 1)
    name = next(iter(first))
    assert not torch.equal(first[name], second[name])


def test_a_site_with_other_keys_is_not_served_the_cached_plaintext(federation, tmp_path) -> None:
    exp, like, codecs, _ = federation
    content = _aggregate(exp, codecs, like, server_round=4)
    codecs[0].decode(content, P.ARRAYS, like)  # now cached under the federation's key set
    other_exp = _experiment(tmp_path)  # a fresh key set: another secret key, another fingerprint
    stranger = _codecs(other_exp, tmp_path)[0]
    hits, _ = _stats()
    with pytest.raises(AggregateError, match="encrypted under keys"):
        stranger.decode(content, P.ARRAYS, like)
    assert _stats()[0] == hits


def test_a_corrupt_aggregate_is_refused_by_every_site_and_never_cached(federation) -> None:
    exp, like, codecs, _ = federation
    content = _aggregate(exp, codecs, like, server_round=5)
    arrays, meta = content[P.ARRAYS], content.config_records[P.meta_key(P.ARRAYS)]
    m = WireMeta.from_record(meta)
    blocks = record_blocks(arrays, m.num_blocks, m.per_array)
    damaged = bytearray(blocks[0])
    damaged[len(damaged) // 2] ^= 0x01  # a coefficient's low bit: still loads, decrypts wrong
    blocks[0] = bytes(damaged)
    bad = RecordDict({P.ARRAYS: blocks_to_record(blocks, m.per_array), P.meta_key(P.ARRAYS): meta})
    for codec in codecs:
        with pytest.raises((AggregateIntegrityError, AggregateError)):
            codec.decode(bad, P.ARRAYS, like)
    assert len(site_codec._DECRYPTED) == 0
