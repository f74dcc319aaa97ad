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
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, sample_nodes

from fedcl.config import FedclError
from fedcl.config import protocol as P
from fedcl.config.vocabulary import SiteStatus

from .contract import Aggregate, Evaluation, GlobalModel
from .outcomes import SiteDirectory, SiteOutcome

logger = logging.getLogger("fedcl.strategies")

EVAL_PREFIXES = ("correct-t", "count-t", "loss-t")


class SitesUnavailable(FedclError):
    """Too few sites are connected to run a round, even after waiting for them."""


class SiteStrategy:
    """A Flower strategy whose replies are sorted by site and whose results are typed."""

    def __init__(
        self, flower: Strategy, *, summable: bool, max_update_norm: float | None = None
    ) -> None:
        self.flower = flower
        #: Whether the aggregation is an example-weighted sum (so CKKS can compute it).
        self.summable = summable
        #: Bound on ||w_site - w_global||_2 of a plaintext update (``strategy.max_update_norm``).
        self.max_update_norm = max_update_norm
        self.sites = SiteDirectory()
        self._expected: dict[str, int] = {}  # the Flower strategy's node counts as configured

    @property
    def min_available_nodes(self) -> int:
        return int(getattr(self.flower, "min_available_nodes", 1))

    def await_sites(
        self,
        grid: Grid,
        server_round: int,
        *,
        wait_s: float,
        quorum: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> list[str]:
        """Wait until the expected sites are connected, but at most ``wait_s`` seconds.

        Flower's own sampling waits for ``min_available_nodes`` without a deadline, so one site
        that is gone would hang the run. After the deadline the round goes on with the sites
        present if there are at least ``quorum`` of them (sampling among those only), and
        raises :class:`SitesUnavailable` with the reason otherwise. When the sites are back,
        the next round samples from all of them again. Returns the names of the sites seen
        before that are not connected now (so the round can record them).
        """
        expected = self._expected.setdefault("min_available_nodes", self.min_available_nodes)
        deadline = clock() + wait_s
        nodes = list(grid.get_node_ids())
        while len(nodes) < expected and clock() < deadline:
            sleep(min(1.0, max(0.0, deadline - clock())))
            nodes = list(grid.get_node_ids())
        absent = self.sites.forget_absent(nodes)
        if len(nodes) < quorum:
            raise SitesUnavailable(
                f"round {server_round}: {len(nodes)} of {expected} sites connected after "
                f"waiting {wait_s:g} s (train.site_wait_s), fewer than train.quorum = {quorum}"
            )
        if len(nodes) < expected:
            logger.warning(
                "round %d: %d of %d sites connected after %g s; going on with them",
                server_round,
                len(nodes),
                expected,
                wait_s,
            )
        for name in ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes"):
            full = self._expected.setdefault(name, int(getattr(self.flower, name)))
            setattr(self.flower, name, max(1, min(full, len(nodes))))
        return absent

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

    def train_nodes(self, grid: Grid) -> list[int]:
        """The nodes a round samples as Flower's ``configure_train`` would (fraction_train).

        For the rounds whose messages Flower does not build (EWC's consolidation), so they
        ask as many sites as a training round: 100 of 1,000, not all of them.
        """
        flower = self.flower
        fraction = float(getattr(flower, "fraction_train", 1.0))
        wanted = max(int(len(list(grid.get_node_ids())) * fraction), flower.min_train_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, wanted)
        return list(nodes)

    # --- receiving --------------------------------------------------------------------------
    def screen(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[SiteOutcome], list[tuple[str, str]]]:
        """One outcome per node, named by its node; checks every reply, plain or encrypted, shares.

        A second reply from a node in the same round is set aside (its first one counts, and
        the site keeps that status); a reply that says it answers another round is stale and
        *rejected*. Returns (outcomes, ignored) and logs every site that did not succeed.

        The outcomes come back sorted by site id, not in reply order: replies arrive in the
        order Flower's ``sample_nodes`` (an unseeded ``random.sample``) sent the messages, or
        in whatever order the network delivered them, and a float32 weighted sum in another
        order differs in the last bits, which a few rounds of training amplify (the same
        seed gave zero-shot 0.689 / 0.677 / 0.683 on defects-vl). Sorted, the aggregate of
        the same updates is bit-identical whatever the arrival order.
        """
        outcomes, ignored, seen = [], [], set()
        for o in self.sites.sort(replies):
            if o.node_id in seen:
                ignored.append((o.site_id, f"a second reply from its node in round {server_round}"))
                continue
            seen.add(o.node_id)
            claimed = o.extras.get(P.SERVER_ROUND)
            if o.ok and claimed is not None and claimed != str(server_round):
                o = replace(
                    o,
                    status=SiteStatus.REJECTED,
                    detail=f"stale: the reply answers round {claimed}, not round {server_round}",
                )
            outcomes.append(o)
        outcomes.sort(key=lambda o: o.site_id)  # stable; one outcome per node already
        for o in outcomes:
            if not o.ok:
                logger.warning(
                    "round %d: site %s %s: %s", server_round, o.site_id, o.status, o.detail
                )
        for site, reason in ignored:
            logger.warning("round %d: ignored a reply of site %s: %s", server_round, site, reason)
        return outcomes, ignored

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], *, sent: GlobalModel
    ) -> Aggregate:
        """Example-weighted average of the valid replies (Flower's own FedAvg arithmetic).

        Each plaintext reply is validated against the model it claims to update before it is
        averaged: a bad one is *rejected* with its reason and the round goes on without it.
        """
        outcomes, ignored = self.screen(server_round, replies)
        reference = sent.state()
        digest = sent.digest()
        checked = []
        decoded: dict[int, dict[str, np.ndarray]] = {}  # id(reply) -> its weights, read once
        for o in outcomes:
            problem = self.check_update(o, reference, digest, decoded=decoded) if o.ok else None
            if problem is not None:
                logger.warning(
                    "round %d: rejected the update of %s: %s", server_round, o.site_id, problem
                )
                o = replace(o, status=SiteStatus.REJECTED, detail=problem)
            checked.append(o)
        good = [o for o in checked if o.ok and o.num_examples > 0]
        if not good:
            return Aggregate(None, checked, ignored=ignored)
        arrays, state = weighted_mean(
            [o.message.content for o in good], [decoded.get(id(o.message)) for o in good]
        )
        n = sum(o.num_examples for o in good)
        metrics = {P.NUM_EXAMPLES: float(n)}
        if all(P.TRAIN_LOSS in o.metrics for o in good):  # under DP sites keep their loss
            metrics[P.TRAIN_LOSS] = sum(o.metrics[P.TRAIN_LOSS] * o.num_examples for o in good) / n
        model = GlobalModel(arrays) if state is None else GlobalModel.of_state(arrays, state)
        return Aggregate(model, checked, metrics, ignored)

    def check_update(
        self,
        o: SiteOutcome,
        reference: dict[str, torch.Tensor],
        digest: str | None,
        *,
        decoded: dict[int, dict[str, np.ndarray]] | None = None,
    ) -> str | None:
        """Why a plaintext update must not be averaged, or None: layout, finite, base, norm.

        ``decoded`` (by ``id`` of the reply) receives the weights read here, so the average
        (:func:`weighted_mean`) does not deserialise every reply a second time.
        """
        record = o.message.content.array_records.get(P.ARRAYS) if o.message else None
        if record is None:
            return "the reply holds no model weights"
        arrays = {k: v.numpy() for k, v in record.items()}
        if decoded is not None:
            decoded[id(o.message)] = arrays
        state = {k: torch.from_numpy(a) for k, a in arrays.items()}  # to_torch_state_dict's
        if set(state) != set(reference):
            missing = sorted(set(reference) - set(state))
            extra = sorted(set(state) - set(reference))
            return f"wrong model layout (missing {missing[:3]}, unexpected {extra[:3]})"
        for name, t in state.items():
            if t.shape != reference[name].shape:
                shape = tuple(reference[name].shape)
                return f"wrong model layout: {name!r} has shape {tuple(t.shape)}, not {shape}"
            if t.is_floating_point() and not torch.isfinite(t).all():
                return f"non-finite values in {name!r}"
        base = o.extras.get(P.MODEL_SHA256)
        if digest is not None and base is not None and base != digest:
            return f"trained from model {base[:12]}…, but this round's model is {digest[:12]}…"
        if self.max_update_norm is not None:
            norm = update_norm(state, reference)
            if norm > self.max_update_norm:
                return (
                    f"update norm {norm:.4g} exceeds strategy.max_update_norm = "
                    f"{self.max_update_norm}"
                )
        return None

    def recover(
        self, server_round: int, result: Aggregate, *, sent: GlobalModel, verify
    ) -> Aggregate:
        """Plaintext updates were checked one by one before averaging: nothing to recover."""
        return result

    def sum_shares(self, server_round: int, key: str, replies: Iterable[Message]) -> Aggregate:
        """Plaintext sum of the sites' shares (``F·n`` with its ``__count__``)."""
        outcomes, ignored = self.screen(server_round, replies)
        good = [o for o in outcomes if o.ok and o.message is not None]
        total: dict[str, torch.Tensor] = {}
        for o in good:
            for name, t in o.message.content[key].to_torch_state_dict().items():
                total[name] = total[name] + t if name in total else t.clone()
        model = GlobalModel(ArrayRecord(total)) if good else None
        return Aggregate(model, outcomes, ignored=ignored)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluation:
        """Pool per-task counts over sites: accuracy on task j = Σ correct_j / Σ count_j."""
        outcomes, _ignored = self.screen(server_round, replies)
        return pooled_evaluation(outcomes)


def pooled_evaluation(outcomes: list[SiteOutcome]) -> Evaluation:
    """Per-task counts summed over the sites that answered ok (Σ correct_j / Σ count_j)."""
    totals: dict[str, float] = {}
    for o in outcomes:
        if not o.ok:
            continue
        for key, value in o.metrics.items():
            if key.startswith(EVAL_PREFIXES):
                totals[key] = totals.get(key, 0.0) + value
    return Evaluation(totals, outcomes)


def carried_evaluation(outcomes: Iterable[SiteOutcome]) -> Evaluation:
    """The evaluation a round's train replies carried, of the model the round was sent.

    With ``evaluation.mode = "with_train"`` a site evaluates the model it receives before it
    trains on it and sends both in one reply (``P.EVALUATION``). A reply counts when the
    site trained or refused to train (an evaluation it paid for still leaves). A site whose
    message failed failed its evaluation too, with the same reason (as an evaluate message
    would have); a rejected reply (stale, another site's) carries none. A site whose
    evaluation was refused by its policy or ledger is a *refused* outcome here, as it would be
    for an evaluate message.
    """
    scored = []
    for o in outcomes:
        if o.status == SiteStatus.FAILED:
            scored.append(replace(o, message=None, metrics={}, bytes_up=0, num_examples=0))
            continue
        if o.message is None or o.status not in (SiteStatus.OK, SiteStatus.REFUSED):
            continue
        record = o.message.content.metric_records.get(P.EVALUATION)
        if record is None:
            continue
        metrics = {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]
        refused = o.extras.get(P.EVALUATION_STATUS) == SiteStatus.REFUSED
        scored.append(
            SiteOutcome(
                o.site_id,
                o.node_id,
                SiteStatus.REFUSED if refused else SiteStatus.OK,
                num_examples=int(metrics.get(P.NUM_EXAMPLES, 0)),
                detail=o.extras.get(P.EVALUATION_DETAIL, ""),
                metrics=metrics,
                extras={k: v for k, v in o.extras.items() if k == P.AGGREGATE_CORRUPT},
            )
        )
    return pooled_evaluation(scored)


def update_norm(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||w - w_ref||_2 over the floating-point tensors of a state dict."""
    total = 0.0
    for name, t in state.items():
        if t.is_floating_point():
            total += float(((t.double() - reference[name].double()) ** 2).sum())
    return total**0.5


def weighted_mean(
    records: list[RecordDict], decoded: list[dict[str, np.ndarray] | None]
) -> tuple[ArrayRecord, dict[str, torch.Tensor] | None]:
    """Flower's ``aggregate_arrayrecords(records, "num-examples")``, from weights already read;
    returns the average and, when it was computed here, the same weights as tensors.

    The same arithmetic in the same order (weights ``n_i / Σn``, ``a = w_0·x_0``, then
    ``a += w_i·x_i``), so the result is byte-identical; a reply with other array records than
    its weights, or one not read yet, is left to Flower's function (no tensors then).
    """
    if any(a is None for a in decoded) or any(list(r.array_records) != [P.ARRAYS] for r in records):
        return aggregate_arrayrecords(records, P.NUM_EXAMPLES), None
    weights = [next(iter(r.metric_records.values()))[P.NUM_EXAMPLES] for r in records]
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for arrays, weight in zip(decoded, (w / total for w in weights), strict=True):
        for key, value in arrays.items():  # type: ignore[union-attr]
            if key not in out:
                out[key] = value * weight
            else:
                out[key] += value * weight
    arrays = {k: np.asarray(v) for k, v in out.items()}
    return (
        ArrayRecord({k: Array(a) for k, a in arrays.items()}),
        {k: torch.from_numpy(a) for k, a in arrays.items()},
    )
