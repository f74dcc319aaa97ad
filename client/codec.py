"""The site's update codec: how state arrives from the coordinator and how updates leave.

One codec is chosen per job (:func:`codec_for`), plaintext or CKKS, and everything else at the
site — training, consolidation, evaluation — calls it without knowing which. The CKKS codec
holds the site's secret context (``key_path`` in ``site.toml``; the coordinator never has it).
A site encrypts its example-weighted *weights*, so every aggregate decrypts to a whole model and
a site that missed rounds is current again after one message.

Stochastic rounding in the CKKS quantiser is seeded from the experiment seed, the site and the
server round, so a configuration reruns bit-identically.
"""

from __future__ import annotations

import hashlib
import operator
import os
import threading
import zlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from fedcl.config import ConfigError, ExperimentConfig, FedclError, SiteConfig
from fedcl.config import protocol as P

Records = dict[str, object]  # record key -> ArrayRecord / ConfigRecord for the reply
Stats = dict[str, float]  # site-side numbers that go into the reply's MetricRecord


def split_count(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Separate the example-count array from a summed record (plaintext shares carry one)."""
    tensors = {k: v for k, v in state.items() if k != P.COUNT_ARRAY}
    count = int(round(float(state[P.COUNT_ARRAY].reshape(-1)[0]))) if P.COUNT_ARRAY in state else 0
    return tensors, count


class UpdateCodec(Protocol):
    def decode(
        self, content: RecordDict, key: str, like: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """A model the coordinator sent under ``key``, named and shaped like ``like``."""
        ...

    def decode_sum(
        self, content: RecordDict, key: str, like: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """A summed share as (Σ, n), so that Σ / n is the federation's weighted mean."""
        ...

    def encode_update(
        self, state: dict[str, torch.Tensor], num_examples: int, base: str, server_round: int
    ) -> tuple[Records, Stats]:
        """The reply records of a trained model, weighted by ``num_examples``."""
        ...

    def encode_share(
        self,
        key: str,
        state: dict[str, torch.Tensor],
        num_examples: int,
        base: str,
        server_round: int,
    ) -> tuple[Records, Stats]:
        """The reply records of ``num_examples``·``state``, to be summed over sites."""
        ...

    def verify_group(self, content: RecordDict, like: dict[str, torch.Tensor]) -> bool:
        """Whether a group sum the coordinator formed decrypts intact (HE only)."""
        ...


class PlainCodec:
    """Weights in clear; Flower's FedAvg weights them by the reported example count."""

    def decode(self, content, key, like):
        return content[key].to_torch_state_dict()

    def decode_sum(self, content, key, like):
        return split_count(content[key].to_torch_state_dict())

    def encode_update(self, state, num_examples, base, server_round):
        return {P.ARRAYS: ArrayRecord(state)}, {P.NUM_EXAMPLES: num_examples}

    def verify_group(self, content, like):
        raise FedclError("a plaintext run has no encrypted group sums to verify")

    def encode_share(self, key, state, num_examples, base, server_round):
        n = float(num_examples)
        share = {k: v.detach().to("cpu", torch.float32) * n for k, v in state.items()}
        share[P.COUNT_ARRAY] = torch.tensor([float(num_examples)])
        return {key: ArrayRecord(share)}, {P.NUM_EXAMPLES: num_examples}


@lru_cache(maxsize=4)
def _secret_context(path: str, mtime: float, fingerprint: str | None):
    from fedcl.privacy.ckks.keys import load_secret_context

    return load_secret_context(path, expected_fingerprint=fingerprint)


#: ``FEDCL_CKKS_DECRYPT_CACHE=0`` makes every decode decrypt, even a repeat in one process.
ENV_DECRYPT_CACHE = "FEDCL_CKKS_DECRYPT_CACHE"
#: Decrypted aggregates kept per process: this round's model and one more (a Fisher share, the
#: previous model); each holds a whole model in memory, so few.
DECRYPT_CACHE_ENTRIES = 2
_DECRYPTED: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_DECRYPTED_LOCK = threading.Lock()
#: The ciphertext bytes objects last hashed and their digest: the in-process engine hands every
#: site a deep copy of the message, which shares the (immutable) bytes, so they are hashed once
#: (aggregates up to MEMO_MAX_BYTES; a larger one is hashed per site rather than kept alive).
MEMO_MAX_BYTES = 16 << 20
_DIGEST_MEMO: dict[str, tuple[tuple[str, ...], tuple[bytes, ...], bytes]] = {}
#: Decodes served from the cache and decrypted, per process (tests read them).
DECRYPT_CACHE_STATS = {"hits": 0, "misses": 0}


def _decrypt_cache_enabled() -> bool:
    return os.environ.get(ENV_DECRYPT_CACHE, "1").strip() not in ("0", "false", "no")


def clear_decrypt_cache() -> None:
    """Forget every decrypted aggregate of this process (tests; a host that rotates keys)."""
    with _DECRYPTED_LOCK:
        _DECRYPTED.clear()
        _DIGEST_MEMO.clear()


def _aggregate_key(record: ArrayRecord, meta, ctx, packing, like: dict[str, torch.Tensor]):
    """What a decrypted aggregate depends on: its ciphertext bytes and metadata, the key set
    (the fingerprint of the context: one secret key per public key), the packing the
    experiment expects, and the model it is shaped like (names, shapes, dtypes)."""
    from fedcl.privacy.ckks.keys import fingerprint

    names = sorted(record.keys())
    datas = tuple(record[name].data for name in names)
    # Kept referenced only while small: the memo must not hold a large model's ciphertext.
    immutable = all(type(d) is bytes for d in datas) and sum(map(len, datas)) <= MEMO_MAX_BYTES
    with _DECRYPTED_LOCK:
        memo = _DIGEST_MEMO.get("last")
    if (
        immutable
        and memo is not None
        and memo[0] == tuple(names)
        and len(memo[1]) == len(datas)
        and all(map(operator.is_, memo[1], datas))
    ):
        blocks = memo[2]  # the very bytes objects hashed last time (bytes are immutable)
    else:
        h = hashlib.sha256()
        for name, data in zip(names, datas, strict=True):
            h.update(name.encode() + b"\0")
            h.update(data)
        blocks = h.digest()
        if immutable:
            with _DECRYPTED_LOCK:
                _DIGEST_MEMO["last"] = (tuple(names), datas, blocks)
    digest = hashlib.sha256(blocks)
    digest.update(repr(sorted(meta.items())).encode())
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in like.items())
    return (fingerprint(ctx), digest.digest(), packing, shapes)


class CKKSCodec:
    """Encrypts and decrypts under this site's secret context; the count stays in the ciphertext.

    One process that plays several virtual sites (the in-process engine, a Ray actor) receives
    the same aggregate once per site each round: it is decrypted and decoded once and served
    from a small per-process cache to the others (:data:`DECRYPT_CACHE_ENTRIES`; keyed by the
    ciphertext's SHA-256, its metadata, the key set and the model's shapes, so another
    aggregate, key or model is never served from it). A deployed site, one per process,
    decrypts each aggregate once anyway. What is cached is the federation's model every site of
    the process holds; an aggregate that fails its checks is not cached, so every site refuses
    it as before.
    """

    def __init__(self, experiment: ExperimentConfig, site: SiteConfig):
        if site.key_path is None:
            raise ConfigError(
                f"site {site.site_id}: the experiment encrypts updates (he.enabled) but site.toml "
                "has no key_path; set key_path = '/etc/fedcl/keys/secret.ctx' (from `fedcl keys "
                "init`, copied to the site out of band)"
            )
        path = Path(site.key_path)
        if not path.is_file():
            raise ConfigError(f"site {site.site_id}: key_path {path} does not exist")
        self.he = experiment.he
        self.seed = experiment.seed
        self.site_id = site.site_id
        self.ctx = _secret_context(str(path), path.stat().st_mtime, self.he.fingerprint)

    def _packing(self, key: str):
        from fedcl.privacy.ckks import packing_for

        # Models are clipped at he.clip; shares (EWC's Fisher, its anchor's kin) at fisher_clip.
        fisher = key == P.FISHER or key.startswith(f"{P.FISHER}-")
        return packing_for(self.he, fisher=fisher)

    def _rng(self, key: str, server_round: int) -> np.random.Generator:
        site = zlib.crc32(self.site_id.encode())
        return np.random.default_rng([self.seed, site, server_round, zlib.crc32(key.encode())])

    def decode(self, content, key, like):
        meta = content.config_records.get(P.meta_key(key))
        if meta is None:  # round 1 of an encrypted run starts from the plaintext initial model
            return content[key].to_torch_state_dict()
        return self._decrypt(content[key], meta, key, like)

    def decode_sum(self, content, key, like):
        meta = content.config_records.get(P.meta_key(key))
        if meta is None:
            return split_count(content[key].to_torch_state_dict())
        return self._decrypt(content[key], meta, key, like), 1  # decrypts to the mean

    def _decrypt(self, record, meta, key, like):
        if not _decrypt_cache_enabled():
            return self._decrypt_now(record, meta, key, like)
        tag = _aggregate_key(record, meta, self.ctx, self._packing(key), like)
        with _DECRYPTED_LOCK:
            hit = _DECRYPTED.get(tag)
            if hit is not None:
                _DECRYPTED.move_to_end(tag)
                DECRYPT_CACHE_STATS["hits"] += 1
        if hit is None:
            hit = self._decrypt_now(record, meta, key, like)  # raises before anything is cached
            with _DECRYPTED_LOCK:
                DECRYPT_CACHE_STATS["misses"] += 1
                _DECRYPTED[tag] = hit
                while len(_DECRYPTED) > DECRYPT_CACHE_ENTRIES:
                    _DECRYPTED.popitem(last=False)
        return {k: v.clone() for k, v in hit.items()}  # a site may change its copy in place

    def _decrypt_now(self, record, meta, key, like):
        from fedcl.privacy.ckks.codec import Layout
        from fedcl.privacy.ckks.wire import decode_aggregate

        mean, _total, _sites = decode_aggregate(
            record, meta, self.ctx, layout=Layout.from_state_dict(like), packing=self._packing(key)
        )
        return {
            k: torch.from_numpy(np.asarray(mean[k])).to(like[k].dtype).reshape(like[k].shape)
            for k in like
        }

    def _encrypt(self, key, state, num_examples, base, server_round):
        from fedcl.privacy.ckks.codec import Layout
        from fedcl.privacy.ckks.wire import encrypt_update

        enc = encrypt_update(
            state,
            num_examples,
            self.ctx,
            self._packing(key),
            layout=Layout.from_state_dict(state),
            base_sha256=base,
            rng=self._rng(key, server_round),
        )
        stats = {k: float(v) for k, v in enc.stats.metrics().items()}
        return {key: enc.arrays, P.meta_key(key): enc.meta}, stats

    def encode_update(self, state, num_examples, base, server_round):
        return self._encrypt(P.ARRAYS, state, num_examples, base, server_round)

    def verify_group(self, content: RecordDict, like: dict[str, torch.Tensor]) -> bool:
        """Whether a group sum of encrypted updates decrypts with an intact checksum."""
        from fedcl.privacy.ckks.groups import verify_group_sum
        from fedcl.privacy.ckks.layout import Layout

        return verify_group_sum(
            content[P.ARRAYS],
            content.config_records.get(P.meta_key(P.ARRAYS)),
            self.ctx,
            layout=Layout.from_state_dict(like),
            min_group_size=self.he.min_group_size,
            packing=self._packing(P.ARRAYS),
        )

    def encode_share(self, key, state, num_examples, base, server_round):
        return self._encrypt(key, state, num_examples, base, server_round)


def codec_for(experiment: ExperimentConfig, site: SiteConfig) -> UpdateCodec:
    """The one place a site decides between clear and encrypted updates."""
    return CKKSCodec(experiment, site) if experiment.he.enabled else PlainCodec()
