"""The coordinator's run loop: tasks, rounds, evaluation and recording (docs/DESIGN.md §3).

It drives a strategy round by round rather than calling Flower's ``strategy.start()``, because a
continual run is a *sequence of tasks*, each with its own rounds, and because a restarted
coordinator must resume after the last round the registry says was completed. The loop only
sequences: the schedule and the initial model come from the :class:`RunPlan` the sites use too,
aggregation (plain or encrypted — the loop cannot tell) from the strategy's typed results,
storage from :mod:`.versions` and book-keeping from :mod:`.recording`. Every round is recorded in
the registry before the next one starts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedcl.config import ExperimentConfig, FedclError, to_json
from fedcl.config import protocol as P
from fedcl.config.vocabulary import Metric, Phase, RoundKind, RunStatus
from fedcl.continual.plan import PlannedRound, RunPlan, resolve_evaluation_noise
from fedcl.privacy.dp.counts import count_noise_sd
from fedcl.strategies import (
    Aggregate,
    Evaluation,
    GlobalModel,
    SitesUnavailable,
    answered_for,
    build_strategy,
    carried_evaluation,
    record_bytes,
)

from .drift import DriftWatch
from .integrity import reports_corrupt, site_verifier
from .losses import lost_site_rounds
from .observers import RoundSummary, RunObserver
from .recording import RunRecorder
from .registry import MetricRow, Registry
from .versions import ContinualMemory, VersionStore

TTL_MARGIN_S = 10.0  # a message outlives its round's timeout by this much (clock skew)
logger = logging.getLogger("fedcl.server")


@dataclass
class CoordinatorOptions:
    """Everything a coordinator needs besides the Grid."""

    experiment: ExperimentConfig
    registry_url: str
    run_id: str
    scenario: str = "custom"
    sites_dir: str | None = None
    artifacts_dir: str | None = None
    observers: Sequence[RunObserver] = field(default_factory=tuple)
    #: Site id -> the node id its key was registered as (SuperNode authentication).
    site_nodes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Unscored:
    """A model the sites have not evaluated yet: the next train message carries it and asks.

    With ``evaluation.mode = "with_train"`` a round's output is evaluated at the start of the
    next round's training, at the sites sampled for it, and recorded on *its own* round
    (``round_id``; None for the untrained baseline), so the accuracy matrix keeps its meaning.
    """

    step: PlannedRound
    round_id: int | None
    model: GlobalModel
    #: The round's aggregation and the model it was sent (for a culprit search); None after a
    #: resume, when only the model is known.
    result: Aggregate | None = None
    sent: GlobalModel | None = None
    #: Nodes that gave no reply to this round's training: not asked to evaluate at the end.
    silent: frozenset[int] = frozenset()


BASELINE = PlannedRound(0, 0, 0, RoundKind.TRAIN)  # the untrained model, evaluated for b_j
AGGREGATED_S = "aggregate-seconds"  # Aggregate.metrics: the coordinator's time to aggregate


def round_costs(result: Aggregate) -> list[MetricRow]:
    """What a round cost to aggregate, and (HE) the sites' mean decrypt and encrypt times."""
    rows = []
    if AGGREGATED_S in result.metrics:
        rows.append(MetricRow(Metric.AGGREGATE_SECONDS, float(result.metrics[AGGREGATED_S])))
    for key, name in (
        (P.HE_DECRYPT_S, Metric.HE_DECRYPT_SECONDS),
        (P.HE_ENCRYPT_S, Metric.HE_ENCRYPT_SECONDS),
    ):
        values = [o.metrics[key] for o in result.contributors if key in o.metrics]
        if values:
            rows.append(MetricRow(name, sum(values) / len(values)))
    return rows


class Coordinator:
    """Runs one experiment over a Grid and records everything in the registry."""

    def __init__(self, grid: Grid, options: CoordinatorOptions):
        self.grid = grid
        self.options = options
        # The evaluation σ stated, so the sites, the registry and results.json read one value.
        self.experiment = resolve_evaluation_noise(options.experiment)
        self.plan = RunPlan.of(self.experiment)
        self.initial = self.plan.initial_model()
        self.strategy = build_strategy(self.experiment, initial=self.initial)
        for site, node in options.site_nodes.items():  # authenticated: no reply can claim them
            self.strategy.sites.bind(node, site)
        self.registry = Registry.open(options.registry_url, artifacts_dir=options.artifacts_dir)
        self.run_id = options.run_id
        self.versions = VersionStore(self.registry, self.run_id)
        dp = self.experiment.dp
        self.recorder = RunRecorder(
            self.registry,
            self.run_id,
            len(self.plan.stream.evaluation_tasks),
            count_noise_sd=(
                count_noise_sd(dp.evaluation_noise_multiplier)
                if dp.evaluation_mode == "noised"
                else None
            ),
        )
        self.memory = ContinualMemory()
        self.drift = DriftWatch(self.experiment, self.plan, self.registry, self.run_id)
        self.experiment_json = to_json(self.experiment)
        self.timeout = self.experiment.train.round_timeout_s
        #: One round trip per round: a train message also evaluates the model it carries.
        self.with_train = self.experiment.evaluates_with_train
        self.unscored: Unscored | None = None

    def base_config(self, step: PlannedRound) -> ConfigRecord:
        cfg = {
            P.EXPERIMENT: self.experiment_json,
            P.RUN_ID: self.run_id,
            P.TASK_INDEX: step.task_index,
            P.ROUND_IN_TASK: step.round_in_task,
            P.SERVER_ROUND: step.server_round,
        }
        if self.options.sites_dir:
            cfg[P.SITES_DIR] = self.options.sites_dir
        return ConfigRecord(cfg)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> str:
        """Run (or resume) the experiment; returns the run's final status."""
        self.registry.create_run(
            self.run_id,
            name=self.experiment.name,
            scenario=self.options.scenario,
            config=self.experiment.model_dump(mode="json"),
            tasks=[t.name for t in self.plan.stream.tasks],
        )
        self.registry.set_run_status(self.run_id, RunStatus.RUNNING)
        schedule = self.plan.schedule
        resume = self.versions.resume(GlobalModel(ArrayRecord(self.initial.state_dict())))
        model, done, self.memory = resume.model, resume.done_rounds, resume.memory
        self._notify("run_started", self.run_id, len(schedule), done)
        if done == 0:  # what the bytes per parameter of results.json divide by
            size = sum(t.numel() for t in self.initial.state_dict().values())
            self.registry.record_metrics(
                self.run_id, None, [MetricRow(Metric.MODEL_PARAMETERS, float(size))]
            )
        status, reason = RunStatus.COMPLETED, None
        try:
            if done == 0 and not self.with_train:
                self._baseline_evaluation(model)
            elif self.with_train:
                self.unscored = self._unscored_at_start(model, done)
            for step in schedule[done:]:
                if step.kind == RoundKind.MONITOR:  # between tasks: until drift opens the next
                    if self.drift.waiting(step):
                        self._monitor(model, step)
                    continue
                if step.round_in_task == 0 and not self.drift.begin(step):
                    break  # a task only drift opens, and nothing did: the run ends here
                if step.kind == RoundKind.CONSOLIDATE:
                    result = self._consolidate(model, step)
                    if result.model is None:
                        status = RunStatus.FAILED
                        reason = self.recorder.no_update_reason(step.server_round, result.outcomes)
                        break
                    continue
                next_model, result = self._train(model, step)
                if next_model is None:
                    status, reason = self.recorder.end_reason(step.server_round, result.outcomes)
                    break
                model = next_model
            self._score_last()
        except SitesUnavailable as exc:
            status, reason = RunStatus.FAILED, str(exc)
            self._score_last()
        except BaseException as exc:
            status = RunStatus.STOPPED
            reason = f"coordinator stopped: {type(exc).__name__}: {exc}"
            self.registry.set_run_status(self.run_id, status, reason)
            self._notify("run_finished", self.run_id, status, reason)
            raise
        if status == RunStatus.COMPLETED:  # completed, but not a plain success if sites were lost
            lost = lost_site_rounds(self.registry.list_participations(self.run_id))
            reason = lost.describe() if lost.total else None
        self.registry.set_run_status(self.run_id, status, reason)
        if reason:
            log = logger.warning if status == RunStatus.COMPLETED else logger.error
            log("run %s %s: %s", self.run_id, status, reason)
        self._notify("run_finished", self.run_id, status, reason)
        return status

    def _notify(self, event: str, *args) -> None:
        for obs in self.options.observers:
            getattr(obs, event)(*args)

    def _send(self, messages: list[Message]) -> list[Message]:
        """Send and wait up to the round timeout; a message expires with its round.

        Without a TTL a site that was away would find the messages of rounds that gave up on
        it when it comes back, and work through them (training on stale models, one ClientApp
        each) before it gets to the round that waits for it.
        """
        if self.timeout is not None:
            for msg in messages:
                msg.metadata.ttl = self.timeout + TTL_MARGIN_S
        return answered_for(messages, self.grid.send_and_receive(messages, timeout=self.timeout))

    def _baseline_evaluation(self, model: GlobalModel) -> None:
        """Accuracy of the untrained model on every task: the b_j of forward transfer."""
        evaluation = self._evaluate(model, PlannedRound(0, 0, 0, RoundKind.TRAIN))
        self.recorder.privacy(None, evaluation.outcomes)  # a noised evaluation spends ε
        self.registry.record_metrics(
            self.run_id, None, self.recorder.accuracy_rows(evaluation, baseline=True)
        )

    def _evaluate(
        self, model: GlobalModel, step: PlannedRound, silent: frozenset[int] = frozenset()
    ) -> Evaluation:
        # Sites that left since training must not hang Flower's sampling: evaluate who is there
        # (the round already waited for them; only the untrained baseline waits here). A site
        # that gave no reply to this round's training is not asked again: a lost site costs a
        # round its timeout once, not once per phase.
        wait_s = self.experiment.train.site_wait_s if step.server_round == 0 else 0.0
        self.strategy.await_sites(self.grid, step.server_round, wait_s=wait_s, quorum=1)
        config = self.base_config(step)
        messages = self.strategy.configure_evaluate(step.server_round, model, config, self.grid)
        messages = [m for m in messages if m.metadata.dst_node_id not in silent]
        return self.strategy.aggregate_evaluate(step.server_round, self._send(messages))

    def _evaluate_canary_first(
        self, model: GlobalModel, step: PlannedRound, silent: frozenset[int]
    ) -> Evaluation:
        """The candidate goes to the canary sites first and to the others only if it holds
        there (server/canary.py); without canary sites (or production yet) to everyone."""
        max_drop, sites = self.experiment.canary_max_drop, self.experiment.canary_sites
        nodes = {n for n in (self.strategy.sites.node(s) for s in sites) if n is not None}
        if max_drop is None or not nodes:
            return self._evaluate(model, step, silent)
        from .canary import holds_at_canary_sites

        others = frozenset(self.grid.get_node_ids()) - nodes
        first = self._evaluate(model, step, silent | others)
        rows = self.recorder.accuracy_rows(first)
        holds = holds_at_canary_sites(
            self.registry, self.run_id, rows, sites=sites, max_drop=max_drop
        )
        if holds is False:
            self.registry.audit(
                "canary.withheld",
                f"round {step.server_round}: the candidate fell more than {max_drop} at canary "
                f"sites {', '.join(sites)}; the other sites do not receive it",
                run_id=self.run_id,
                actor="canary",
            )
            return first
        rest = self._evaluate(model, step, silent | nodes)
        totals = dict(first.totals)
        for key, value in rest.totals.items():
            totals[key] = totals.get(key, 0.0) + value
        return Evaluation(totals, first.outcomes + rest.outcomes)

    def _begin(self, step: PlannedRound) -> int:
        return self.registry.begin_round(
            self.run_id,
            task_index=step.task_index,
            round_in_task=step.round_in_task,
            server_round=step.server_round,
            kind=step.kind,
        )

    # --- a training round ----------------------------------------------------------------------
    def _train(
        self, model: GlobalModel, step: PlannedRound
    ) -> tuple[GlobalModel | None, Aggregate]:
        """Train, aggregate, store, evaluate; returns the model the next round starts from.

        With ``evaluation.mode = "with_train"`` the train replies also carry the evaluation of
        the model they were sent, the previous round's output (:class:`Unscored`), and this
        round's model waits for the next train message (or :meth:`_score_last`).
        """
        start = time.perf_counter()
        round_id = self._begin(step)
        self._await_sites(step, round_id)
        unscored = self.unscored if self.with_train else None
        repaired = False
        while True:
            messages, replies, result = self._exchange(model, step, unscored)
            corrupt = reports_corrupt(Evaluation({}, result.outcomes))
            if unscored is None or repaired or not corrupt:
                break  # once repaired, a site still reporting corruption fails on its own
            repaired = True
            # The model they were sent (the previous round's sum) does not decrypt intact at
            # the sites: find its culprits, then send this round again from the repaired model.
            recovered, reason = self._repair(unscored)
            if recovered is None or recovered.model is None:
                self.registry.fail_round(round_id, reason)
                return None, Aggregate(None, result.outcomes)
            model = recovered.model
            unscored = replace(unscored, model=model, result=recovered)
        # With the evaluation carried by the train replies and no drift report to ask for,
        # nothing round-trips between the replies and the round's end: one commit for the round.
        one_commit = self.with_train and not self.drift.enabled
        with self.registry.batch() if one_commit else contextlib.nullcontext():
            next_model, result, summary = self._close_train_round(
                step, round_id, start, model, unscored, messages, replies, result
            )
        if summary is not None:  # after the commit: observers may read the registry
            self._notify("round_finished", summary)
        return next_model, result

    def _close_train_round(
        self,
        step: PlannedRound,
        round_id: int,
        start: float,
        model: GlobalModel,
        unscored: Unscored | None,
        messages: list[Message],
        replies: list[Message],
        result: Aggregate,
    ) -> tuple[GlobalModel | None, Aggregate, RoundSummary | None]:
        """Record the replies, store the output, evaluate it (separate evaluation) and complete
        the round; returns the next round's model, the aggregation and the round's summary
        (None, with no model, for a round that failed)."""
        silent = frozenset(m.metadata.dst_node_id for m in messages) - {
            r.metadata.src_node_id for r in replies
        }
        evaluation, rows, evaluated = None, [], None
        if unscored is not None:
            evaluation, evaluated = carried_evaluation(result.outcomes), unscored.step.server_round
        with self.registry.batch():  # one commit for everything the round's replies say
            if evaluation is not None:
                lost = [m for m in messages if m.metadata.dst_node_id in silent]
                rows = self._record_evaluation(unscored, evaluation, carried_by=lost)
            self.recorder.replies(
                round_id, Phase.TRAIN, result, messages, self.strategy.sites,
                expected=model.digest(),
            )  # fmt: skip
            if result.model is None:
                reason = self.recorder.no_update_reason(step.server_round, result.outcomes)
                self.registry.fail_round(round_id, reason)
                if unscored is not None and not evaluation.outcomes:  # nobody scored it: at the end
                    self.unscored = replace(unscored, silent=silent)
                else:
                    self.unscored = None
                return None, result, None
            self.versions.save(
                round_id, task_index=step.task_index, server_round=step.server_round,
                model=result.model,
            )  # fmt: skip
        if not self.with_train:
            evaluation = self._evaluate_canary_first(result.model, step, silent)
            if reports_corrupt(evaluation):
                result, evaluation, reason = self._recover(step, round_id, model, result)
                if evaluation is None:
                    self.registry.fail_round(round_id, reason)
                    return None, result, None
            evaluated = step.server_round
        train_rows = round_costs(result)
        if P.TRAIN_LOSS in result.metrics:
            train_rows.append(MetricRow(Metric.TRAIN_LOSS, float(result.metrics[P.TRAIN_LOSS])))
        self._drift(result.model, step, round_id)  # its own round trip: before the batch
        with self.registry.batch():  # the canary reads the rows this transaction wrote
            if not self.with_train:
                unscored_now = Unscored(step, round_id, result.model)
                rows = self._record_evaluation(unscored_now, evaluation)
            self.registry.record_metrics(self.run_id, round_id, train_rows)
            next_model = self.versions.after_canary(
                result.model, self.experiment.canary_max_drop, self.experiment.canary_sites
            )
            seconds = time.perf_counter() - start
            self.registry.complete_round(
                round_id,
                seconds=seconds,
                bytes_up=sum(o.bytes_up for o in result.outcomes),
                bytes_down=sum(record_bytes(m.content) for m in messages),
            )
        if self.with_train:
            self.unscored = Unscored(step, round_id, next_model, result, model, silent)
        summary = self.recorder.summary(step, seconds, result, rows + train_rows, evaluated)
        return next_model, result, summary

    def _exchange(
        self, model: GlobalModel, step: PlannedRound, unscored: Unscored | None
    ) -> tuple[list[Message], list[Message], Aggregate]:
        """One train round trip: (messages sent, replies, their aggregation)."""
        config = self.base_config(step)
        if unscored is not None:
            config[P.EVALUATE_ROUND] = unscored.step.server_round
        messages = self.strategy.configure_train(step.server_round, model, config, self.grid)
        self._attach_memory(messages)
        replies = self._send(messages)
        start = time.perf_counter()
        result = self.strategy.aggregate_train(step.server_round, replies, sent=model)
        seconds = time.perf_counter() - start
        return messages, replies, replace(result, metrics={**result.metrics, AGGREGATED_S: seconds})

    def _record_evaluation(
        self,
        unscored: Unscored,
        evaluation: Evaluation,
        *,
        carried_by: list[Message] | None = None,
    ) -> list[MetricRow]:
        """Record an evaluation on the round whose model it scored; returns its accuracy rows.

        ``carried_by`` is None for an evaluate message, whose replies also report the ε they
        spent; for the train replies that carried it (their ε, evaluation included, goes with
        their own round) it lists the messages that got no reply: those evaluations were lost.
        """
        baseline = unscored.round_id is None
        rows = self.recorder.accuracy_rows(evaluation, baseline=baseline)
        if not baseline:
            self.recorder.participation(
                unscored.round_id,
                Phase.EVALUATE,
                evaluation.outcomes,
                carried_by or None,
                self.strategy.sites,
            )
        if carried_by is None:
            self.recorder.privacy(unscored.round_id, evaluation.outcomes)  # noised: spends ε
        self.registry.record_metrics(self.run_id, unscored.round_id, rows)
        return rows

    def _unscored_at_start(self, model: GlobalModel, done: int) -> Unscored | None:
        """What the first train message evaluates: the untrained model, or after a resume the
        last completed training round's model if its evaluation never arrived."""
        if done == 0:
            return Unscored(BASELINE, None, model)
        trained = [
            r
            for r in self.registry.list_rounds(self.run_id)
            if r.kind == RoundKind.TRAIN and r.status == "completed" and r.server_round <= done
        ]
        if not trained:
            return None
        last = trained[-1]
        if last.server_round in self.registry.federation_accuracy_by_round(self.run_id):
            return None
        step = PlannedRound(last.server_round, last.task_index, last.round_in_task, RoundKind.TRAIN)
        return Unscored(step, last.id, model)

    def _score_last(self) -> None:
        """The run's last model is evaluated by an evaluate message (nothing trains after it)."""
        unscored, self.unscored = self.unscored, None
        if unscored is None:
            return
        try:
            evaluation = self._evaluate(unscored.model, unscored.step, unscored.silent)
        except SitesUnavailable as exc:
            logger.warning("the last model was not evaluated: %s", exc)
            return
        with self.registry.batch():
            self._record_evaluation(unscored, evaluation)

    def _repair(self, unscored: Unscored) -> tuple[Aggregate | None, str]:
        """The sites found the model they were sent corrupt: the culprit search on its round."""
        step = unscored.step
        if unscored.result is None or unscored.sent is None or unscored.round_id is None:
            return None, f"round {step.server_round}: corrupt aggregate, and nothing to re-sum"
        return self._search_culprits(step, unscored.round_id, unscored.sent, unscored.result)

    def _recover(
        self, step: PlannedRound, round_id: int, sent: GlobalModel, result: Aggregate
    ) -> tuple[Aggregate, Evaluation | None, str]:
        """The sites found the aggregate corrupt: sum again without the culprits, re-evaluate."""
        recovered, reason = self._search_culprits(step, round_id, sent, result)
        if recovered is None:
            return Aggregate(None, result.outcomes), None, reason
        if recovered.model is None:
            return recovered, None, reason
        return recovered, self._evaluate(recovered.model, step), ""

    def _search_culprits(
        self, step: PlannedRound, round_id: int, sent: GlobalModel, result: Aggregate
    ) -> tuple[Aggregate | None, str]:
        """Re-sum ``result`` without the sites whose ciphertexts corrupted it; store it.

        Returns (None, reason) when the search failed, and the re-sum (whose model is None when
        no site is left) with the reason otherwise.
        """
        logger.warning("round %d: the sites report a corrupt aggregate", step.server_round)
        verify = site_verifier(self._send, self.base_config(step), self.strategy.sites, result)
        try:
            recovered = self.strategy.recover(step.server_round, result, sent=sent, verify=verify)
        except FedclError as exc:
            reason = f"round {step.server_round}: corrupt aggregate, culprit search failed: {exc}"
            return None, reason
        culprits = [
            o for o, was in zip(recovered.outcomes, result.outcomes, strict=True) if o != was
        ]
        with self.registry.batch():
            self.recorder.rejections(
                round_id, Phase.TRAIN, [(o.site_id, o.detail) for o in culprits]
            )
            self.recorder.participation(round_id, Phase.TRAIN, culprits, None, self.strategy.sites)
            if self.with_train:  # the round completed before its sites could decrypt its sum
                self.registry.recount_round(round_id)
            if recovered.model is None:
                return recovered, self.recorder.no_update_reason(step.server_round, culprits)
            self.versions.save(
                round_id, task_index=step.task_index, server_round=step.server_round,
                model=recovered.model,
            )  # fmt: skip
        return recovered, ""

    # --- continual learning: the consolidation round -----------------------------------------
    def _attach_memory(self, messages: list[Message]) -> None:
        """Every train message carries the EWC inputs, so no site can fall behind."""
        if not self.memory.fisher or self.memory.anchor is None:
            return
        for msg in messages:
            msg.content[P.CONFIG][P.FISHER_TASKS] = len(self.memory.fisher)
        self.strategy.attach(messages, P.ANCHOR, self.memory.anchor)
        for k, fisher in enumerate(self.memory.fisher):
            self.strategy.attach(messages, P.fisher_key(k), fisher)

    def _consolidate(self, model: GlobalModel, step: PlannedRound) -> Aggregate:
        """Sum the sites' Fisher shares of the task at ``model`` (EWC's θ*)."""
        start = time.perf_counter()
        round_id = self._begin(step)
        self._await_sites(step, round_id)
        content = RecordDict({P.ARRAYS: model.arrays, P.CONFIG: self.base_config(step)})
        nodes = self.strategy.train_nodes(self.grid)  # sampled like a training round
        messages = [Message(content, node, P.CONSOLIDATE) for node in nodes]
        self.strategy.attach(messages, P.ARRAYS, model)
        result = self.strategy.sum_shares(step.server_round, P.FISHER, self._send(messages))
        self.recorder.replies(round_id, Phase.CONSOLIDATE, result, messages, self.strategy.sites)
        if result.model is None:
            reason = self.recorder.no_update_reason(step.server_round, result.outcomes)
            self.registry.fail_round(round_id, reason)
            return result
        self.versions.save(
            round_id, task_index=step.task_index, server_round=step.server_round,
            model=result.model, fisher=True,
        )  # fmt: skip
        self.memory.fisher.append(result.model)
        self.memory.anchor = model
        self.registry.complete_round(
            round_id,
            seconds=time.perf_counter() - start,
            bytes_up=sum(o.bytes_up for o in result.outcomes),
            bytes_down=sum(record_bytes(m.content) for m in messages),
        )
        logger.info(
            "task %d consolidated: Fisher from %d sites", step.task_index, len(result.contributors)
        )
        return result

    # --- drift (docs/DESIGN.md §12) -------------------------------------------------------------
    def _drift(self, model: GlobalModel, step: PlannedRound, round_id: int) -> tuple[int, int]:
        """Ask every site whether its data moved from the current task's; record, maybe open.

        Returns the bytes (up, down) the reports took.
        """
        if not self.drift.enabled:
            return 0, 0
        content = RecordDict({P.ARRAYS: model.arrays, P.CONFIG: self.base_config(step)})
        messages = [Message(content, node, P.DRIFT) for node in self._all_nodes()]
        self.strategy.attach(messages, P.ARRAYS, model)
        outcomes, _ = self.strategy.screen(step.server_round, self._send(messages))
        self.recorder.privacy(round_id, outcomes)  # a DP drift report spends ε
        self.drift.record(round_id, step, outcomes)
        return sum(o.bytes_up for o in outcomes), sum(record_bytes(m.content) for m in messages)

    def _monitor(self, model: GlobalModel, step: PlannedRound) -> None:
        """A monitoring round between two tasks: only the sites' drift reports."""
        start = time.perf_counter()
        round_id = self._begin(step)
        self._await_sites(step, round_id)
        up, down = self._drift(model, step, round_id)
        self.registry.complete_round(
            round_id, seconds=time.perf_counter() - start, bytes_up=up, bytes_down=down
        )

    def _await_sites(self, step: PlannedRound, round_id: int) -> None:
        train = self.experiment.train
        quorum = train.quorum if train.quorum is not None else self.experiment.expected_sites
        try:
            absent = self.strategy.await_sites(
                self.grid, step.server_round, wait_s=train.site_wait_s, quorum=quorum
            )
        except SitesUnavailable as exc:
            self.registry.fail_round(round_id, str(exc))
            raise
        self.recorder.absent(round_id, step.kind, absent, wait_s=train.site_wait_s)

    def _all_nodes(self) -> list[int]:
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        available = list(self.grid.get_node_ids())
        nodes, _ = sample_nodes(self.grid, self.strategy.min_available_nodes, len(available))
        return nodes
