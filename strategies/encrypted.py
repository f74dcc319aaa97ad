"""Encrypted aggregation as a wrapper around any summable strategy (docs/DESIGN.md §4–§5).

Like Flower's DP wrappers, :class:`Encrypted` wraps another strategy and changes one thing: the
aggregation. Sites reply with their example-weighted, quantised update encrypted under the
federation's key (:mod:`fedcl.privacy.ckks`); the wrapper holds only the *public* context (it
refuses a secret one), validates every reply against what the round expects (key fingerprint,
model layout, packing, block count and sizes, ciphertexts that deserialize under the public
context, the model the site trained from), drops a bad reply as *rejected* with its reason, and
sums the rest block-wise. The encrypted sum, with the example counts still inside it, is the new
global model, which the sites decrypt. Only a strategy whose aggregation is a weighted sum
(``summable``) can be wrapped: a server-side optimiser or a median cannot run on ciphertexts.

What the coordinator learns: which sites took part and their plaintext metrics (train loss).
Not their updates, not their example counts (so the train loss is a plain mean over sites).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedcl.config import ConfigError, ExperimentConfig
from fedcl.config import protocol as P
from fedcl.config.vocabulary import SiteStatus
from fedcl.privacy.ckks.codec import Layout, Packing
from fedcl.privacy.ckks.errors import CKKSKeyError, ReplyRejected
from fedcl.privacy.ckks.wire import EncryptedSum, ExpectedReply, WireMeta

from .contract import Aggregate, Evaluation, GlobalModel, Verify, is_encrypted
from .outcomes import SiteOutcome
from .sites import SiteStrategy

logger = logging.getLogger("fedcl.strategies")

__all__ = ["CONTRIBUTORS", "Encrypted", "is_encrypted", "majority_base"]

CONTRIBUTORS = "contributors"  # metric: how many sites' ciphertexts were summed


class Encrypted:
    """Validation and a ciphertext sum in place of ``strategy``'s plaintext average."""

    def __init__(
        self,
        strategy: SiteStrategy,
        *,
        public_context: Any,
        packing: Packing,
        layout: Layout,
        share_packing: Packing | None = None,
        share_layout: Layout | None = None,
        min_group_size: int = 2,
    ) -> None:
        if not strategy.summable:
            raise ConfigError(
                f"field 'he.enabled': {type(strategy.flower).__name__} does not aggregate by a "
                "weighted sum, so it cannot run on ciphertexts; use fedavg or fedprox"
            )
        if public_context.is_private():
            raise CKKSKeyError(
                "the coordinator was given a SECRET CKKS context; it must load public.ctx "
                "(fedcl.privacy.ckks.load_public_context) and never hold the secret key"
            )
        self.inner = strategy
        self.sites = strategy.sites
        self.min_group_size = min_group_size
        self.public_context = public_context
        self.expected = ExpectedReply.build(public_context, packing, layout)
        self.expected_share = (
            ExpectedReply.build(public_context, share_packing, share_layout)
            if share_packing is not None and share_layout is not None
            else None
        )

    @classmethod
    def for_experiment(
        cls, strategy: SiteStrategy, experiment: ExperimentConfig, model: Any
    ) -> Encrypted:
        """The coordinator's CKKS custody for ``experiment``: public key, layouts, packings."""
        from fedcl.privacy.ckks import check_packing, packing_for
        from fedcl.privacy.ckks.keys import load_public_context

        he = experiment.he
        if not he.public_context:
            raise ConfigError(
                "field 'he.public_context': he.enabled needs the coordinator's public.ctx "
                "(from `fedcl keys init`); the coordinator never loads secret.ctx"
            )
        check_packing(he)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return cls(
            strategy,
            public_context=load_public_context(he.public_context, he.fingerprint),
            packing=packing_for(he),
            layout=Layout.from_state_dict(model.state_dict()),
            share_packing=packing_for(he, fisher=True),
            share_layout=Layout.from_state_dict(params),
            min_group_size=he.min_group_size,
        )

    @property
    def min_available_nodes(self) -> int:
        return self.inner.min_available_nodes

    def await_sites(self, grid: Grid, server_round: int, **kwargs: Any) -> list[str]:
        return self.inner.await_sites(grid, server_round, **kwargs)

    def train_nodes(self, grid: Grid) -> list[int]:
        return self.inner.train_nodes(grid)

    # --- sending ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = self.inner.configure_train(server_round, model, config, grid)
        self.attach_meta(messages, P.ARRAYS, model)
        return messages

    def configure_evaluate(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = self.inner.configure_evaluate(server_round, model, config, grid)
        self.attach_meta(messages, P.ARRAYS, model)
        return messages

    def attach(self, messages: list[Message], key: str, model: GlobalModel) -> None:
        self.inner.attach(messages, key, model)
        self.attach_meta(messages, key, model)

    @staticmethod
    def attach_meta(messages: list[Message], key: str, model: GlobalModel) -> None:
        """Send an encrypted model's metadata beside it (a plaintext model needs none)."""
        if not is_encrypted(model.arrays):
            return  # the plaintext initial model of round 1
        if model.meta is None:
            raise ValueError(
                "encrypted arrays without metadata: a GlobalModel holding CKKS blocks needs the "
                "aggregate's ConfigRecord (stored with the model version)"
            )
        meta = WireMeta.from_record(model.meta)
        if -(-meta.num_blocks // meta.per_array) != len(model.arrays):  # blocks grouped per Array
            raise ValueError("the GlobalModel's metadata does not describe its encrypted arrays")
        for msg in messages:
            msg.content[P.meta_key(key)] = model.meta

    # --- receiving --------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], *, sent: GlobalModel
    ) -> Aggregate:
        """Validate and sum the replies to ``sent``.

        No reply carries an example count in clear, so none is filtered on one. The model the
        updates must start from is ``sent``'s hash when the coordinator knows it (a plaintext
        initial model); otherwise (it cannot decrypt what it sent) the replies' majority.
        """
        outcomes, ignored = self.inner.screen(server_round, replies)
        good = [o for o in outcomes if o.ok]
        if not good:
            return Aggregate(None, outcomes, ignored=ignored)
        expected = self.expected.with_base(sent.digest() or majority_base(good))
        model, outcomes = self._sum(server_round, expected, P.ARRAYS, outcomes)
        summed = [o for o in outcomes if o.ok]
        losses = [o.metrics[P.TRAIN_LOSS] for o in summed if P.TRAIN_LOSS in o.metrics]
        metrics: dict[str, float] = {CONTRIBUTORS: float(len(summed))}
        if losses:
            metrics[P.TRAIN_LOSS] = sum(losses) / len(losses)
        return Aggregate(model, outcomes, metrics if model is not None else {}, ignored)

    def recover(
        self, server_round: int, result: Aggregate, *, sent: GlobalModel, verify: Verify
    ) -> Aggregate:
        """The round's sum without the sites whose updates corrupt it (docs/DESIGN.md §4).

        A bit flipped inside a ciphertext passes every check the coordinator can make and only
        shows when the sites decrypt (the checksum inside the plaintext). The culprits are then
        found by adaptive group testing over sums of at least ``he.min_group_size`` sites, each
        checked by a site outside the group (:mod:`fedcl.privacy.ckks.groups`), so no single
        site's update is ever decrypted alone; the others' sum becomes the round's model.
        """
        from fedcl.privacy.ckks.groups import recover_aggregate

        summed = result.contributors
        replies = {
            o.site_id: (
                o.message.content.array_records[P.ARRAYS],
                o.message.content.config_records[P.HE_META],
            )
            for o in summed
        }
        expected = self.expected.with_base(sent.digest() or majority_base(summed))
        recovery = recover_aggregate(expected, replies, verify, min_group_size=self.min_group_size)
        search = recovery.search
        culprits = set(search.culprits) | set(search.undetermined)
        for site in sorted(culprits):
            logger.warning(
                "round %d: the update of %s corrupts the aggregate (group sums)", server_round, site
            )
        outcomes = [
            replace(
                o,
                status=SiteStatus.REJECTED,
                detail=(
                    "its update corrupts the encrypted aggregate (found by group sums of "
                    f">= {self.min_group_size} sites; no single update was decrypted)"
                ),
            )
            if o.site_id in culprits
            else o
            for o in result.outcomes
        ]
        if recovery.arrays is None:
            return Aggregate(None, outcomes, {}, result.ignored)
        model = GlobalModel(recovery.arrays, recovery.meta)
        metrics = {**result.metrics, CONTRIBUTORS: float(len(search.honest))}
        return Aggregate(model, outcomes, metrics, result.ignored)

    def sum_shares(self, server_round: int, key: str, replies: Iterable[Message]) -> Aggregate:
        """Sum the sites' encrypted shares under ``key`` (EWC's Fisher), validated like updates."""
        if self.expected_share is None:
            raise ValueError("this Encrypted strategy was built without a share layout")
        outcomes, ignored = self.inner.screen(server_round, replies)
        model, outcomes = self._sum(server_round, self.expected_share, key, outcomes)
        return Aggregate(model, outcomes, ignored=ignored)

    def _sum(
        self, server_round: int, expected: ExpectedReply, key: str, outcomes: list[SiteOutcome]
    ) -> tuple[GlobalModel | None, list[SiteOutcome]]:
        """Add every valid reply's ciphertexts block-wise; mark the others *rejected*."""
        total = EncryptedSum(expected)
        marked = []
        for o in outcomes:
            if not o.ok:
                marked.append(o)
                continue
            try:
                if o.message is None:
                    raise ReplyRejected("no message content")
                content = o.message.content
                total.add(
                    content.array_records.get(key), content.config_records.get(P.meta_key(key))
                )
                marked.append(o)
            except ReplyRejected as exc:
                logger.warning(
                    "round %d: rejected the %s of site %s: %s",
                    server_round,
                    key,
                    o.site_id,
                    exc.reason,
                )
                marked.append(replace(o, status=SiteStatus.REJECTED, detail=exc.reason))
        if total.count == 0:
            return None, marked
        arrays, meta = total.result()
        logger.info(
            "round %d: summed %d encrypted %s records (%d rejected)",
            server_round,
            total.count,
            key,
            sum(o.status == SiteStatus.REJECTED for o in marked),
        )
        return GlobalModel(arrays, meta), marked

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluation:
        return self.inner.aggregate_evaluate(server_round, replies)


def majority_base(good: list[SiteOutcome]) -> str | None:
    """The model most replies say they trained from (their CKKS metadata's ``base``)."""
    bases: Counter[str] = Counter()
    for o in good:
        meta = o.message.content.config_records.get(P.HE_META) if o.message else None
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
