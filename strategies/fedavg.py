"""FedAvg and FedProx that know which *site* each reply came from.

They subclass Flower's own strategies and change one thing: replies are first sorted into
:class:`SiteOutcome`s, so a failed or refusing site is recorded by name and left out of the
average instead of failing the round. ``aggregate_updates`` is the one hook the encrypted
strategy overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.config import protocol as P

from .outcomes import SiteDirectory, SiteOutcome

logger = logging.getLogger("fedcl.strategies")


class SiteAwareMixin:
    """Adds site bookkeeping to a Flower strategy (mixed in before the Flower class)."""

    def _init_sites(self) -> None:
        self.sites = SiteDirectory()
        self.last_train_outcomes: list[SiteOutcome] = []
        self.last_evaluate_outcomes: list[SiteOutcome] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcomes = self.sites.sort(replies)
        self.last_train_outcomes = outcomes
        for o in outcomes:
            if not o.ok:
                logger.warning(
                    "round %d: site %s %s: %s", server_round, o.site_id, o.status, o.detail
                )
        good = [o for o in outcomes if o.ok and o.num_examples > 0]
        if not good:
            return None, None
        arrays = self.aggregate_updates(server_round, good)
        n = sum(o.num_examples for o in good)
        loss = sum(o.metrics.get(P.TRAIN_LOSS, 0.0) * o.num_examples for o in good) / n
        return arrays, MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: loss})

    def aggregate_updates(self, server_round: int, good: list[SiteOutcome]) -> ArrayRecord | None:
        """Example-weighted average of the sites' weights (Flower's own FedAvg arithmetic)."""
        return aggregate_arrayrecords([o.message.content for o in good], P.NUM_EXAMPLES)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pool per-task counts over sites: accuracy on task j = Σ correct_j / Σ count_j."""
        outcomes = self.sites.sort(replies)
        self.last_evaluate_outcomes = outcomes
        totals: dict[str, float] = {}
        for o in outcomes:
            if not o.ok:
                logger.warning(
                    "evaluation round %d: site %s %s: %s",
                    server_round,
                    o.site_id,
                    o.status,
                    o.detail,
                )
                continue
            for key, value in o.metrics.items():
                if key.startswith(("correct-t", "count-t", "loss-t")):
                    totals[key] = totals.get(key, 0.0) + value
        if not totals:
            return None
        return MetricRecord(totals)


class SiteFedAvg(SiteAwareMixin, FedAvg):
    """Flower's FedAvg with site-aware reply handling."""

    def __init__(self, **kwargs) -> None:
        FedAvg.__init__(self, **kwargs)
        self._init_sites()


class SiteFedProx(SiteAwareMixin, FedProx):
    """Flower's FedProx (it sends ``proximal-mu``; the site adds the proximal term)."""

    def __init__(self, **kwargs) -> None:
        FedProx.__init__(self, **kwargs)
        self._init_sites()
