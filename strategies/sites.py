"""Any Flower strategy, told which *site* each reply came from.

:class:`SiteStrategy` holds a Flower strategy (FedAvg, FedProx, …) and uses it for what Flower
does well — sampling nodes, waiting for enough of them, the per-round config (FedProx's
``proximal-mu``) — and adds what a federation of named sites needs: replies are first sorted
into :class:`SiteOutcome`s, so a failed or refusing site is recorded by name and left out of the
average instead of failing the round, and every result comes back as one typed value
(:mod:`fedcl.strategies.contract`).

Its aggregation is the example-weighted mean (Flower's own ``aggregate_arrayrecords``); a
strategy whose aggregation is such a sum says so with ``summable``, and only those can be wrapped
by :class:`~fedcl.strategies.encrypted.Encrypted`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.config import protocol as P

from .contract import Aggregate, Evaluation, GlobalModel
from .outcomes import SiteDirectory, SiteOutcome

logger = logging.getLogger("fedcl.strategies")

EVAL_PREFIXES = ("correct-t", "count-t", "loss-t")


class SiteStrategy:
    """A Flower strategy whose replies are sorted by site and whose results are typed."""

    def __init__(self, flower: Strategy, *, summable: bool) -> None:
        self.flower = flower
        #: Whether the aggregation is an example-weighted sum (so CKKS can compute it).
        self.summable = summable
        self.sites = SiteDirectory()

    @property
    def min_available_nodes(self) -> int:
        return int(getattr(self.flower, "min_available_nodes", 1))

    # --- sending ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return list(self.flower.configure_train(server_round, model.arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        return list(self.flower.configure_evaluate(server_round, model.arrays, config, grid))

    def attach(self, messages: list[Message], key: str, model: GlobalModel) -> None:
        for msg in messages:
            msg.content[key] = model.arrays

    # --- receiving --------------------------------------------------------------------------
    def sort(self, server_round: int, replies: Iterable[Message]) -> list[SiteOutcome]:
        """One outcome per reply, with every site that did not succeed logged by name."""
        outcomes = self.sites.sort(replies)
        for o in outcomes:
            if not o.ok:
                logger.warning(
                    "round %d: site %s %s: %s", server_round, o.site_id, o.status, o.detail
                )
        return outcomes

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], *, base: str | None = None
    ) -> Aggregate:
        """Example-weighted average of the sites' weights (Flower's own FedAvg arithmetic)."""
        outcomes = self.sort(server_round, replies)
        good = [o for o in outcomes if o.ok and o.num_examples > 0]
        if not good:
            return Aggregate(None, outcomes)
        arrays = aggregate_arrayrecords([o.message.content for o in good], P.NUM_EXAMPLES)
        n = sum(o.num_examples for o in good)
        loss = sum(o.metrics.get(P.TRAIN_LOSS, 0.0) * o.num_examples for o in good) / n
        metrics = {P.NUM_EXAMPLES: float(n), P.TRAIN_LOSS: loss}
        return Aggregate(GlobalModel(arrays), outcomes, metrics)

    def sum_shares(self, key: str, outcomes: list[SiteOutcome]) -> Aggregate:
        """Plaintext sum of the sites' shares (``F·n`` with its ``__count__``)."""
        good = [o for o in outcomes if o.ok and o.message is not None]
        total: dict[str, torch.Tensor] = {}
        for o in good:
            for name, t in o.message.content[key].to_torch_state_dict().items():
                total[name] = total[name] + t if name in total else t.clone()
        model = GlobalModel(ArrayRecord(total)) if good else None
        return Aggregate(model, outcomes)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluation:
        """Pool per-task counts over sites: accuracy on task j = Σ correct_j / Σ count_j."""
        outcomes = self.sites.sort(replies)
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
                if key.startswith(EVAL_PREFIXES):
                    totals[key] = totals.get(key, 0.0) + value
        return Evaluation(totals, outcomes)
