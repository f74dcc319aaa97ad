"""FedAvg and FedProx over CKKS ciphertexts: the coordinator adds, it never decrypts.

Sites reply with their example-weighted, quantised update encrypted under the federation's key
(:mod:`fedcl.privacy.ckks`). This strategy holds only the *public* context (it refuses a secret
one), validates every reply against what this round expects (key fingerprint, model layout,
packing, block count and sizes, ciphertexts that deserialize under the public context, the model
the site trained from) and drops a bad reply with a logged reason instead of failing the round.
The rest are summed block-wise; the encrypted sum (with the example counts still inside it) is
the new "global model", which the coordinator stores and sends to the sites with its metadata.

What the coordinator learns: which sites took part and their plaintext metrics (train loss).
Not their updates, not their example counts (so the train loss is a plain mean over sites).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedcl.config import protocol as P
from fedcl.privacy.ckks.codec import Layout, Packing
from fedcl.privacy.ckks.errors import CKKSKeyError, ReplyRejected
from fedcl.privacy.ckks.wire import (
    BLOCK_PREFIX,
    BLOCK_STYPE,
    META_KEY,
    EncryptedSum,
    ExpectedReply,
    WireMeta,
)

from .fedavg import SiteFedAvg, SiteFedProx
from .outcomes import SiteOutcome

logger = logging.getLogger("fedcl.strategies")

CONTRIBUTORS = "contributors"  # MetricRecord key: sites whose ciphertexts were summed


def is_encrypted(arrays: ArrayRecord | None) -> bool:
    """Whether an ArrayRecord holds CKKS blocks (rather than plaintext weights)."""
    if not arrays:
        return False
    first = next(iter(arrays.keys()))
    return first.startswith(BLOCK_PREFIX) and arrays[first].stype == BLOCK_STYPE


class EncryptedMixin:
    """Replaces the plaintext average by validation and a ciphertext sum (mixed in first)."""

    arrayrecord_key: str

    def _init_encryption(
        self,
        public_context: Any,
        packing: Packing,
        layout: Layout,
        *,
        expected_base: str | None = None,
    ) -> None:
        if public_context.is_private():
            raise CKKSKeyError(
                "the coordinator was given a SECRET CKKS context; it must load public.ctx "
                "(fedcl.privacy.ckks.load_public_context) and never hold the secret key"
            )
        self.public_context = public_context
        self.expected = ExpectedReply.build(public_context, packing, layout)
        #: SHA-256 of this round's model, when the coordinator knows it (e.g. the plaintext
        #: initial model, or what the sites agreed on); otherwise the replies' majority.
        self.expected_base: str | None = expected_base
        #: (site id, reason) of every reply dropped in the last aggregation: audit these.
        self.last_rejections: list[tuple[str, str]] = []
        #: Metadata of the last encrypted aggregate (store it with the arrays; send both).
        self.last_aggregate_meta: ConfigRecord | None = None
        #: Metadata attached to encrypted arrays sent by ``configure_train/evaluate``; set
        #: automatically after each aggregation, and by the coordinator when it resumes.
        self.global_meta: ConfigRecord | None = None
        self._rejected_outcomes: list[SiteOutcome] = []

    # --- sending ----------------------------------------------------------------------------
    def _attach_meta(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        messages = list(messages)
        if not is_encrypted(arrays):
            return messages  # the plaintext initial model of round 1
        if self.global_meta is None:
            raise ValueError(
                "encrypted arrays without metadata: set strategy.global_meta to the aggregate's "
                "ConfigRecord (stored with the model version) before sending it"
            )
        meta = WireMeta.from_record(self.global_meta)
        if -(-meta.num_blocks // meta.per_array) != len(arrays):  # blocks are grouped per Array
            raise ValueError("strategy.global_meta does not describe these encrypted arrays")
        for msg in messages:
            msg.content[META_KEY] = self.global_meta
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        return self._attach_meta(messages, arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        return self._attach_meta(messages, arrays)

    # --- receiving --------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Like the plaintext version, but no reply carries an example count to filter on."""
        outcomes = self.sites.sort(replies)  # type: ignore[attr-defined]
        self.last_train_outcomes = outcomes
        self.last_rejections = []
        for o in outcomes:
            if not o.ok:
                logger.warning(
                    "round %d: site %s %s: %s", server_round, o.site_id, o.status, o.detail
                )
        good = [o for o in outcomes if o.ok]
        if not good:
            return None, None
        arrays = self.aggregate_updates(server_round, good)
        if arrays is None:
            return None, None
        rejected = {id(o) for o in self._rejected_outcomes}
        summed = [o for o in good if id(o) not in rejected]
        losses = [o.metrics[P.TRAIN_LOSS] for o in summed if P.TRAIN_LOSS in o.metrics]
        metrics: dict[str, float | int] = {CONTRIBUTORS: len(summed)}
        if losses:
            metrics[P.TRAIN_LOSS] = sum(losses) / len(losses)
        return arrays, MetricRecord(metrics)

    def aggregate_updates(self, server_round: int, good: list[SiteOutcome]) -> ArrayRecord | None:
        """Validate each reply and add the valid ones' ciphertexts block-wise."""
        self.last_rejections = []
        self._rejected_outcomes = []
        expected = self.expected.with_base(self._round_base(good))
        total = EncryptedSum(expected)
        for o in good:
            content = o.message.content if o.message is not None else None
            try:
                if content is None:
                    raise ReplyRejected("no message content")
                total.add(
                    content.array_records.get(self.arrayrecord_key),
                    content.config_records.get(META_KEY),
                )
            except ReplyRejected as exc:
                logger.warning(
                    "round %d: rejected the update of site %s: %s",
                    server_round,
                    o.site_id,
                    exc.reason,
                )
                self.last_rejections.append((o.site_id, exc.reason))
                self._rejected_outcomes.append(o)
        if total.count == 0:
            self.last_aggregate_meta = None
            return None
        arrays, meta = total.result()
        self.last_aggregate_meta = meta
        self.global_meta = meta
        logger.info(
            "round %d: summed %d encrypted updates (%d rejected)",
            server_round,
            total.count,
            len(self.last_rejections),
        )
        return arrays

    def _round_base(self, good: list[SiteOutcome]) -> str | None:
        """The model this round's updates must start from: known, or the replies' majority."""
        if self.expected_base:
            return self.expected_base
        bases: Counter[str] = Counter()
        for o in good:
            meta = o.message.content.config_records.get(META_KEY) if o.message else None
            try:
                base = WireMeta.from_record(meta).base_sha256
            except ValueError:
                continue
            if base:
                bases[base] += 1
        if not bases:
            return None
        (base, votes), *rest = bases.most_common()
        if rest:
            logger.warning(
                "sites trained from %d different models; summing the %d that agree on %s…",
                len(bases),
                votes,
                base[:16],
            )
        return base


class EncryptedFedAvg(EncryptedMixin, SiteFedAvg):
    """FedAvg whose average is computed by the sites from an encrypted sum."""

    def __init__(
        self,
        *,
        public_context: Any,
        packing: Packing,
        layout: Layout,
        expected_base: str | None = None,
        **kwargs: Any,
    ) -> None:
        SiteFedAvg.__init__(self, **kwargs)
        self._init_encryption(public_context, packing, layout, expected_base=expected_base)


class EncryptedFedProx(EncryptedMixin, SiteFedProx):
    """FedProx (sends ``proximal-mu``) with the encrypted sum of :class:`EncryptedFedAvg`."""

    def __init__(
        self,
        *,
        public_context: Any,
        packing: Packing,
        layout: Layout,
        expected_base: str | None = None,
        **kwargs: Any,
    ) -> None:
        SiteFedProx.__init__(self, **kwargs)
        self._init_encryption(public_context, packing, layout, expected_base=expected_base)
