"""The coordinator's run loop: tasks, rounds, evaluation and recording (DESIGN.md §3).

It drives a Flower strategy's own hooks (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) round by round rather than calling
``strategy.start()``, because a continual run is a *sequence of tasks*, each with its own rounds,
and because a restarted coordinator must resume after the last round the registry says was
completed. Every round is recorded in the registry before the next one starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedcl.config import ConfigError, ExperimentConfig, to_json
from fedcl.config import protocol as P
from fedcl.continual.streams import Stream
from fedcl.continual.tasks import experiment_stream
from fedcl.datasets.info import dataset_info
from fedcl.models import build_model, state_sha256
from fedcl.strategies import SiteFedAvg, SiteFedProx, SiteOutcome, record_bytes

from .observers import RoundSummary, RunObserver
from .registry import MetricRow, Registry

logger = logging.getLogger("fedcl.server")

FISHER_FORMAT = "fisher"  # model-version format prefix of a consolidated task's summed Fisher


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


def initial_model(experiment: ExperimentConfig, stream: Stream) -> torch.nn.Module:
    """The seeded starting model every run of this experiment begins from."""
    info = dataset_info(experiment.data, experiment.seed)
    torch.manual_seed(experiment.seed)
    return build_model(
        experiment.model.name,
        in_channels=info.channels,
        image_size=info.image_size,
        num_classes=stream.num_outputs,
        **experiment.model.options,
    )


def make_strategy(experiment: ExperimentConfig, encryption: Encryption | None = None):
    """FedAvg or FedProx (encrypted when HE is on), told to wait for every expected site."""
    expected = experiment.expected_sites
    s = experiment.strategy
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=max(1, int(expected * s.fraction_train)),
        min_evaluate_nodes=max(1, int(expected * s.fraction_evaluate)),
        min_available_nodes=expected,
    )
    if s.name == "fedprox":
        common["proximal_mu"] = s.proximal_mu
    if encryption is None:
        return SiteFedProx(**common) if s.name == "fedprox" else SiteFedAvg(**common)
    from fedcl.strategies.encrypted import EncryptedFedAvg, EncryptedFedProx

    cls = EncryptedFedProx if s.name == "fedprox" else EncryptedFedAvg
    return cls(
        public_context=encryption.public_context,
        packing=experiment.he.packing(),
        layout=encryption.model_layout,
        expected_base=encryption.initial_sha256,
        **common,
    )


@dataclass
class Encryption:
    """What the coordinator holds for CKKS: the *public* context, layouts, the first model hash."""

    public_context: object
    model_layout: object
    fisher_layout: object
    initial_sha256: str

    @classmethod
    def load(cls, experiment: ExperimentConfig, model: torch.nn.Module) -> Encryption:
        from fedcl.privacy.ckks.codec import Layout
        from fedcl.privacy.ckks.keys import load_public_context

        he = experiment.he
        if not he.public_context:
            raise ConfigError(
                "field 'he.public_context': he.enabled needs the coordinator's public.ctx "
                "(from `fedcl keys init`); the coordinator never loads secret.ctx"
            )
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return cls(
            public_context=load_public_context(he.public_context, he.fingerprint),
            model_layout=Layout.from_state_dict(model.state_dict()),
            fisher_layout=Layout.from_state_dict(params),
            initial_sha256=state_sha256(model.state_dict()),
        )


def arrays_to_bytes(arrays: ArrayRecord) -> bytes:
    """Plaintext model version format: safetensors (loadable anywhere, no pickle)."""
    return save_safetensors({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()})


def arrays_from_bytes(payload: bytes) -> ArrayRecord:
    return ArrayRecord(load_safetensors(payload))


class Coordinator:
    """Runs one experiment over a Grid and records everything in the registry."""

    def __init__(self, grid: Grid, options: CoordinatorOptions):
        self.grid = grid
        self.options = options
        self.experiment = options.experiment
        self.info = dataset_info(self.experiment.data, self.experiment.seed)
        self.stream = experiment_stream(self.experiment, self.info)
        self.encryption = (
            Encryption.load(self.experiment, initial_model(self.experiment, self.stream))
            if self.experiment.he.enabled
            else None
        )
        self.strategy = make_strategy(self.experiment, self.encryption)
        self.registry = Registry.open(options.registry_url, artifacts_dir=options.artifacts_dir)
        self.run_id = options.run_id
        self.experiment_json = to_json(self.experiment)
        # EWC: the summed Fisher of every consolidated task and the model it was computed at,
        # each with its CKKS metadata when encrypted (None in plaintext).
        self.fisher: list[tuple[ArrayRecord, ConfigRecord | None]] = []
        self.anchor: tuple[ArrayRecord, ConfigRecord | None] | None = None

    # --- schedule ---------------------------------------------------------------------------
    def schedule(self) -> list[tuple[int, int, str]]:
        """(task, round in task, kind) of every round; the server round is position + 1.

        With EWC, every task but the last ends with a *consolidate* round in which the sites
        compute the Fisher diagonal of that task at the final global model.
        """
        rounds = self.experiment.train.rounds_per_task
        if self.experiment.is_joint:
            # The joint reference gets the same total number of rounds as the sequence.
            rounds *= len(self.stream.evaluation_tasks)
        ewc = self.experiment.continual.uses_ewc and not self.experiment.is_joint
        plan = []
        for t in range(self.stream.num_tasks):
            plan += [(t, r, "train") for r in range(rounds)]
            if ewc and t < self.stream.num_tasks - 1:
                plan.append((t, rounds, "consolidate"))
        return plan

    def base_config(self, task_index: int, round_in_task: int, server_round: int) -> ConfigRecord:
        cfg = {
            P.EXPERIMENT: self.experiment_json,
            P.RUN_ID: self.run_id,
            P.TASK_INDEX: task_index,
            P.ROUND_IN_TASK: round_in_task,
            P.SERVER_ROUND: server_round,
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
            tasks=[t.name for t in self.stream.tasks],
        )
        self.registry.set_run_status(self.run_id, "running")
        schedule = self.schedule()
        arrays, done = self._resume_point()
        for obs in self.options.observers:
            obs.run_started(self.run_id, len(schedule), done)
        status, reason = "completed", None
        try:
            if done == 0:
                self._baseline_evaluation(arrays)
            for position in range(done, len(schedule)):
                task_index, round_in_task, kind = schedule[position]
                if kind == "consolidate":
                    if not self._consolidate(arrays, task_index, round_in_task, position + 1):
                        status, reason = "failed", self._no_update_reason(position + 1)
                        break
                    continue
                new_arrays = self._round(arrays, task_index, round_in_task, position + 1)
                if new_arrays is None:
                    status, reason = self._end_without_update(position + 1)
                    break
                arrays = new_arrays
        except BaseException as exc:
            status, reason = "stopped", f"coordinator stopped: {type(exc).__name__}: {exc}"
            self.registry.set_run_status(self.run_id, status, reason)
            for obs in self.options.observers:
                obs.run_finished(self.run_id, status, reason)
            raise
        self.registry.set_run_status(self.run_id, status, reason)
        if reason:
            logger.error("run %s %s: %s", self.run_id, status, reason)
        for obs in self.options.observers:
            obs.run_finished(self.run_id, status, reason)
        return status

    def _resume_point(self) -> tuple[ArrayRecord, int]:
        last = self.registry.last_completed_round(self.run_id)
        if last is None:
            model = initial_model(self.experiment, self.stream)
            return ArrayRecord(model.state_dict()), 0
        versions = self.registry.list_model_versions(self.run_id)
        models = [v for v in versions if not v.format.startswith(FISHER_FORMAT)]
        latest = max(models, key=lambda v: v.server_round)
        by_round = {v.server_round: v for v in models}
        for v in sorted(versions, key=lambda v: v.server_round):
            if v.format.startswith(FISHER_FORMAT):
                # The Fisher was computed at the model of the round before it: that is θ*.
                self.fisher.append(self.restore_arrays(self.registry.load_artifact(v)))
                anchor = by_round[v.server_round - 1]
                self.anchor = self.restore_arrays(self.registry.load_artifact(anchor))
        logger.info("run %s: resuming after round %d", self.run_id, last.server_round)
        arrays, meta = self.restore_arrays(self.registry.load_artifact(latest))
        if meta is not None:
            self.strategy.global_meta = meta
            self.strategy.expected_base = None  # the sites' majority from now on
        return arrays, last.server_round

    @staticmethod
    def restore_arrays(payload: bytes) -> tuple[ArrayRecord, ConfigRecord | None]:
        """A stored model version as (arrays to send, CKKS metadata or None)."""
        from fedcl.privacy.ckks.wire import MAGIC, aggregate_from_bytes

        if payload.startswith(MAGIC):
            return aggregate_from_bytes(payload)
        return arrays_from_bytes(payload), None

    @staticmethod
    def store_arrays(
        arrays: ArrayRecord, meta: ConfigRecord | None = None
    ) -> tuple[bytes, bool, str]:
        """(payload, encrypted, format) of a round's model version."""
        if meta is not None:
            from fedcl.privacy.ckks.wire import aggregate_to_bytes

            return aggregate_to_bytes(arrays, meta), True, "ckks"
        return arrays_to_bytes(arrays), False, "safetensors"

    def _save_version(
        self,
        round_id: int,
        task_index: int,
        server_round: int,
        arrays: ArrayRecord,
        meta: ConfigRecord | None,
        kind: str = "",
    ) -> None:
        """Store a round's output (a model, or with ``kind`` a summed Fisher) in the registry."""
        payload, encrypted, fmt = self.store_arrays(arrays, meta)
        self.registry.save_model_version(
            self.run_id,
            round_id,
            task_index=task_index,
            server_round=server_round,
            payload=payload,
            encrypted=encrypted,
            format=f"{kind}-{fmt}" if kind else fmt,
        )

    def _baseline_evaluation(self, arrays: ArrayRecord) -> None:
        """Accuracy of the untrained model on every task: the b_j of forward transfer."""
        totals, outcomes = self._evaluate(arrays, 0, 0, 0)
        rows = self._accuracy_rows(totals, outcomes, name="baseline_accuracy")
        self.registry.record_metrics(self.run_id, None, rows)

    # --- one round ----------------------------------------------------------------------------
    def _round(
        self, arrays: ArrayRecord, task_index: int, round_in_task: int, server_round: int
    ) -> ArrayRecord | None:
        start = time.perf_counter()
        round_id = self.registry.begin_round(
            self.run_id,
            task_index=task_index,
            round_in_task=round_in_task,
            server_round=server_round,
        )
        config = self.base_config(task_index, round_in_task, server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, self.grid))
        self._attach_continual_state(messages)
        bytes_down = sum(record_bytes(m.content) for m in messages)
        replies = self.grid.send_and_receive(
            messages, timeout=self.experiment.train.round_timeout_s
        )
        new_arrays, train_metrics = self.strategy.aggregate_train(server_round, replies)
        outcomes = self.strategy.last_train_outcomes
        outcomes = self._mark_rejected(
            round_id, "train", outcomes, getattr(self.strategy, "last_rejections", [])
        )
        self._record_participation(round_id, "train", outcomes, messages)
        self._record_privacy(round_id, outcomes)
        self._check_agreement(round_id, outcomes, expected=self.expected_digest(arrays))
        bytes_up = sum(o.bytes_up for o in outcomes)
        if new_arrays is None:
            self.registry.fail_round(round_id, self._no_update_reason(server_round))
            return None
        if self.encryption is not None:
            self.strategy.expected_base = None  # later rounds: the sites' majority
        meta = getattr(self.strategy, "last_aggregate_meta", None) if self.encryption else None
        self._save_version(round_id, task_index, server_round, new_arrays, meta)
        totals, eval_outcomes = self._evaluate(new_arrays, task_index, round_in_task, server_round)
        self._record_participation(round_id, "evaluate", eval_outcomes, None)
        rows = self._accuracy_rows(totals, eval_outcomes, name="accuracy")
        if train_metrics is not None:
            rows.append(MetricRow("train_loss", float(train_metrics[P.TRAIN_LOSS])))
        self.registry.record_metrics(self.run_id, round_id, rows)
        if self.experiment.canary_max_drop is not None:
            from fedcl.server.dashboard.canary import evaluate_canary

            verdict = evaluate_canary(
                self.registry, self.run_id, max_drop=self.experiment.canary_max_drop
            )
            if verdict:
                logger.warning("canary: %s; the next round starts from production", verdict)
                new_arrays = self._production_arrays() or new_arrays
        seconds = time.perf_counter() - start
        self.registry.complete_round(
            round_id, seconds=seconds, bytes_up=bytes_up, bytes_down=bytes_down
        )
        summary = RoundSummary(
            task_index,
            round_in_task,
            server_round,
            seconds,
            participants=sum(o.ok for o in outcomes),
            failures=sum(o.status == P.STATUS_FAILED for o in outcomes),
            refusals=sum(o.status == P.STATUS_REFUSED for o in outcomes),
            accuracy={
                r.task_index: r.value for r in rows if r.site_id is None and r.name == "accuracy"
            },
        )
        logger.info(
            "task %d round %d (server round %d): %d sites, %.2fs, accuracy %s",
            task_index,
            round_in_task,
            server_round,
            summary.participants,
            seconds,
            {k: round(v, 3) for k, v in summary.accuracy.items()},
        )
        for obs in self.options.observers:
            obs.round_finished(summary)
        return new_arrays

    # --- continual learning: the consolidation round -----------------------------------------
    def _attach_continual_state(self, messages: list[Message]) -> None:
        """Every train message carries the EWC inputs, so no site can fall behind."""
        if not self.fisher or not messages:
            return
        content = messages[0].content  # Flower's FedAvg sends one shared RecordDict
        content[P.CONFIG][P.FISHER_TASKS] = len(self.fisher)
        records = [(P.ANCHOR, self.anchor)]
        records += [(P.fisher_key(k), f) for k, f in enumerate(self.fisher)]
        for key, (arrays, meta) in records:
            content[key] = arrays
            if meta is not None:
                content[f"{P.HE_META}:{key}"] = meta

    def _consolidate(
        self, arrays: ArrayRecord, task_index: int, round_in_task: int, server_round: int
    ) -> bool:
        """Sum the sites' Fisher shares of ``task_index``; False if no site sent one."""
        start = time.perf_counter()
        round_id = self.registry.begin_round(
            self.run_id,
            task_index=task_index,
            round_in_task=round_in_task,
            server_round=server_round,
            kind="consolidate",
        )
        config = self.base_config(task_index, round_in_task, server_round)
        content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
        if self.encryption is not None and self.strategy.global_meta is not None:
            content[P.HE_META] = self.strategy.global_meta
        messages = [Message(content, node, P.CONSOLIDATE) for node in self._all_nodes()]
        replies = self.grid.send_and_receive(
            messages, timeout=self.experiment.train.round_timeout_s
        )
        outcomes = self.strategy.sites.sort(replies)
        self.strategy.last_train_outcomes = outcomes
        good = [o for o in outcomes if o.ok and o.message is not None]
        summed, meta, rejections = self.sum_fisher(good) if good else (None, None, [])
        outcomes = self._mark_rejected(round_id, "consolidate", outcomes, rejections)
        self.strategy.last_train_outcomes = outcomes  # so a failure names the rejections
        self._record_participation(round_id, "consolidate", outcomes, messages)
        self._record_privacy(round_id, outcomes)
        if summed is None:
            self.registry.fail_round(round_id, self._no_update_reason(server_round))
            return False
        self._save_version(round_id, task_index, server_round, summed, meta, FISHER_FORMAT)
        self.fisher.append((summed, meta))
        self.anchor = (arrays, self.strategy.global_meta if self.encryption else None)
        self.registry.complete_round(
            round_id,
            seconds=time.perf_counter() - start,
            bytes_up=sum(o.bytes_up for o in outcomes),
            bytes_down=sum(record_bytes(m.content) for m in messages),
        )
        logger.info("task %d consolidated: Fisher from %d sites", task_index, len(good))
        return True

    def sum_fisher(
        self, good: list[SiteOutcome]
    ) -> tuple[ArrayRecord | None, ConfigRecord | None, list[tuple[str, str]]]:
        """Sum the sites' Fisher shares: plaintext ``F·n`` (+ ``__count__``), or ciphertexts."""
        if self.encryption is None:
            total: dict[str, torch.Tensor] = {}
            for o in good:
                for name, t in o.message.content[P.FISHER].to_torch_state_dict().items():
                    total[name] = total[name] + t if name in total else t.clone()
            return ArrayRecord(total), None, []
        from fedcl.privacy.ckks.errors import ReplyRejected
        from fedcl.privacy.ckks.wire import EncryptedSum, ExpectedReply

        expected = ExpectedReply.build(
            self.encryption.public_context,
            self.experiment.he.packing(fisher=True),
            self.encryption.fisher_layout,
        )
        total_ct = EncryptedSum(expected)
        rejections = []
        for o in good:
            content = o.message.content
            try:
                total_ct.add(
                    content.array_records.get(P.FISHER),
                    content.config_records.get(f"{P.HE_META}:{P.FISHER}"),
                )
            except ReplyRejected as exc:
                rejections.append((o.site_id, exc.reason))
        if total_ct.count == 0:
            return None, None, rejections
        return (*total_ct.result(), rejections)

    def _record_privacy(self, round_id: int, outcomes: list[SiteOutcome]) -> None:
        """ε each site reports having spent (it accounts; the coordinator only records)."""
        for o in outcomes:
            if P.DP_EPSILON_LIFETIME not in o.metrics:
                continue
            self.registry.record_privacy(
                self.run_id,
                round_id,
                o.site_id,
                epsilon_run=o.metrics.get(P.DP_EPSILON_RUN, 0.0),
                epsilon_lifetime=o.metrics[P.DP_EPSILON_LIFETIME],
                delta=o.metrics.get(P.DP_DELTA, 0.0),
                budget=o.metrics.get(P.DP_BUDGET),
            )

    def _mark_rejected(
        self,
        round_id: int,
        phase: str,
        outcomes: list[SiteOutcome],
        rejections: list[tuple[str, str]],
    ) -> list[SiteOutcome]:
        """Replies that failed validation: dropped, recorded as *rejected* and audited by name."""
        reasons = dict(rejections)
        for site_id, reason in reasons.items():
            logger.warning(
                "round %d: rejected %s reply of %s: %s", round_id, phase, site_id, reason
            )
            self.registry.audit(
                "update.rejected",
                f"{phase} reply of {site_id} rejected: {reason}",
                run_id=self.run_id,
                site_id=site_id,
            )
        return [
            replace(o, status="rejected", detail=reasons[o.site_id]) if o.site_id in reasons else o
            for o in outcomes
        ]

    def _all_nodes(self) -> list[int]:
        from flwr.serverapp.strategy.strategy_utils import sample_nodes

        available = list(self.grid.get_node_ids())
        nodes, _ = sample_nodes(self.grid, self.strategy.min_available_nodes, len(available))
        return nodes

    def expected_digest(self, arrays: ArrayRecord) -> str | None:
        """The model hash every site should report (None when the coordinator cannot know)."""
        from fedcl.strategies.encrypted import is_encrypted

        if is_encrypted(arrays):
            return None  # only the sites can decrypt: their majority is the reference
        return state_sha256(arrays.to_torch_state_dict())

    def _check_agreement(
        self, round_id: int, outcomes: list[SiteOutcome], *, expected: str | None
    ) -> None:
        """Flag sites whose global model or EWC memory differs from the others' (DESIGN §4)."""
        for key, kind in ((P.MODEL_SHA256, "model_hash.mismatch"), (P.EWC_DIGEST, "ewc.mismatch")):
            values = {o.site_id: o.extras[key] for o in outcomes if o.ok and key in o.extras}
            if not values:
                continue
            reference = expected if key == P.MODEL_SHA256 and expected else None
            if reference is None:
                counts: dict[str, int] = {}
                for v in values.values():
                    counts[v] = counts.get(v, 0) + 1
                reference = max(counts, key=lambda v: counts[v])
            odd = sorted(s for s, v in values.items() if v != reference)
            self.registry.record_metrics(
                self.run_id, round_id, [MetricRow(f"{key}-agreement", float(not odd))]
            )
            for site in odd:
                logger.warning("round %d: site %s disagrees on %s", round_id, site, key)
                self.registry.audit(
                    kind,
                    f"site {site} reports {key} {values[site][:12]}… but the federation holds "
                    f"{reference[:12]}…",
                    run_id=self.run_id,
                    site_id=site,
                )

    def _production_arrays(self) -> ArrayRecord | None:
        """The model promoted to production (what a canary rollback returns to)."""
        production = [
            v
            for v in self.registry.list_model_versions(self.run_id)
            if v.status == "production" and not v.format.startswith(FISHER_FORMAT)
        ]
        if not production:
            return None
        arrays, meta = self.restore_arrays(self.registry.load_artifact(production[-1]))
        if meta is not None:
            self.strategy.global_meta = meta
        return arrays

    def _evaluate(
        self, arrays: ArrayRecord, task_index: int, round_in_task: int, server_round: int
    ) -> tuple[dict[str, float], list[SiteOutcome]]:
        config = self.base_config(task_index, round_in_task, server_round)
        messages = self.strategy.configure_evaluate(server_round, arrays, config, self.grid)
        replies = self.grid.send_and_receive(
            messages, timeout=self.experiment.train.round_timeout_s
        )
        totals = self.strategy.aggregate_evaluate(server_round, replies)
        return dict(totals or {}), self.strategy.last_evaluate_outcomes

    def _accuracy_rows(
        self, totals: dict[str, float], outcomes: list[SiteOutcome], *, name: str
    ) -> list[MetricRow]:
        rows = []
        for j in range(len(self.stream.evaluation_tasks)):
            count = totals.get(P.eval_key("count", j), 0.0)
            if count:
                rows.append(MetricRow(name, totals[P.eval_key("correct", j)] / count, task_index=j))
                rows.append(
                    MetricRow(
                        name.replace("accuracy", "loss"),
                        totals[P.eval_key("loss", j)] / count,
                        task_index=j,
                    )
                )
            for o in outcomes:
                n = o.metrics.get(P.eval_key("count", j), 0.0)
                if o.ok and n:
                    acc = o.metrics[P.eval_key("correct", j)] / n
                    rows.append(MetricRow(name, acc, site_id=o.site_id, task_index=j))
        return rows

    def _record_participation(
        self, round_id: int, phase: str, outcomes: list[SiteOutcome], sent: list[Message] | None
    ) -> None:
        for o in outcomes:
            self.registry.record_participation(
                round_id,
                o.site_id,
                phase=phase,
                status=o.status,
                num_examples=o.num_examples,
                detail=o.detail or None,
            )
        if sent is not None:
            answered = {o.node_id for o in outcomes}
            for msg in sent:
                node = msg.metadata.dst_node_id
                if node not in answered:
                    self.registry.record_participation(
                        round_id,
                        self.strategy.sites.name(node),
                        phase=phase,
                        status=P.STATUS_FAILED,
                        detail="no reply before the round timeout (site dropped?)",
                    )

    def _end_without_update(self, server_round: int) -> tuple[str, str]:
        """(status, reason) when a round got no usable update: all refused is a clean stop."""
        outcomes = self.strategy.last_train_outcomes
        if outcomes and all(o.status == P.STATUS_REFUSED for o in outcomes):
            return "stopped", (
                f"round {server_round}: every site refused (privacy budget spent): "
                + "; ".join(f"{o.site_id}: {o.detail}" for o in outcomes)
            )
        return "failed", self._no_update_reason(server_round)

    def _no_update_reason(self, server_round: int) -> str:
        outcomes = self.strategy.last_train_outcomes
        if not outcomes:
            return f"round {server_round}: no site replied"
        parts = [f"{o.site_id} {o.status}: {o.detail}" for o in outcomes]
        return f"round {server_round}: no site returned an update (" + "; ".join(parts) + ")"
