"""``results.json``: the contract other tools read, rebuilt from the registry alone.

Because the registry is the source of truth, the same function serves a finished simulation, a
resumed deployment and the dashboard; nothing is kept in memory between rounds. It reads each
table once (a 200-round, 30-site run has some 30,000 metric rows: reading them again for every
site's matrix took seconds). The dashboard passes the rows in (:class:`RunRows`): it keeps a
running run's rows and reads only a new round's (``fedcl.server.dashboard.service.rows``), so
the document is computed by this one function either way and cannot differ from results.json.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedcl.continual.zero_shot import upload_bytes_per_site, zero_shot_summary

from .losses import lost_site_rounds
from .registry import (
    MetricInfo,
    ParticipationInfo,
    PrivacyInfo,
    Registry,
    RegistryError,
    RoundInfo,
)

RESULTS_VERSION = 1


@dataclass(frozen=True)
class RunRows:
    """The big tables of one run, in the registry's order: what :func:`build_results` reads.

    The order is the facade's (rounds by server round; metrics by server round, run-level rows
    first, then id; participations by server round, site, id; privacy by id), because "the last
    row wins" in the accuracy matrices and in each site's ε: a caller that assembles the rows
    itself (the dashboard, round by round) must keep it.
    """

    rounds: Sequence[RoundInfo]
    metrics: Sequence[MetricInfo]
    participations: Sequence[ParticipationInfo]
    privacy: Sequence[PrivacyInfo]


def read_run_rows(registry: Registry, run_id: str) -> RunRows:
    """All of the run's rows, one query per table."""
    return RunRows(
        rounds=registry.list_rounds(run_id),
        metrics=registry.list_metrics(run_id),
        participations=registry.list_participations(run_id),
        privacy=registry.list_privacy(run_id),
    )


def accuracy_matrix(
    registry: Registry,
    run_id: str,
    *,
    site_id: str | None = None,
    num_eval_tasks: int,
    metric: str = "accuracy",
    rounds: Sequence[RoundInfo] | None = None,
    metrics: Sequence[MetricInfo] | None = None,
    last_of_task: dict[int, int] | None = None,
) -> tuple[list[list[float | None]], list[float | None]]:
    """(R, baseline): R[i][j] = accuracy on task j after the last round of training task i.

    ``metric = "accuracy_noise_sd"`` gives the same matrix of the DP noise's standard deviation
    (noised evaluation: :meth:`fedcl.server.recording.RunRecorder.accuracy_rows`). ``rounds``
    and ``metrics``: the run's rows when the caller already read them; ``last_of_task``:
    :func:`last_round_of_task` of them (one per run, not one per site's matrix).
    """
    if last_of_task is None:
        if rounds is None:
            rounds = registry.list_rounds(run_id)
        last_of_task = last_round_of_task(rounds)
    if metrics is None:
        metrics = registry.list_metrics(run_id)
    by_round: dict[int, dict[int, float]] = defaultdict(dict)
    baseline: list[float | None] = [None] * num_eval_tasks
    for m in metrics:
        if m.site_id != site_id or m.task_index is None or m.task_index >= num_eval_tasks:
            continue
        if m.name == metric and m.server_round is not None:
            by_round[m.server_round][m.task_index] = m.value
        elif m.name == f"baseline_{metric}":
            baseline[m.task_index] = m.value
    matrix = []
    for task in sorted(last_of_task):
        row = by_round.get(last_of_task[task], {})
        matrix.append([row.get(j) for j in range(num_eval_tasks)])
    return matrix, baseline


def last_round_of_task(rounds: Sequence[RoundInfo]) -> dict[int, int]:
    """task index -> the last completed training round of it: the row of the accuracy matrix."""
    last_of_task: dict[int, int] = {}
    for r in rounds:
        if r.kind == "train" and r.status == "completed":
            last_of_task[r.task_index] = max(last_of_task.get(r.task_index, 0), r.server_round)
    return last_of_task


def build_results(
    registry: Registry,
    run_id: str,
    *,
    wall_seconds: float | None = None,
    rows: RunRows | None = None,
) -> dict[str, Any]:
    """Everything a report needs about one run, as plain JSON types.

    ``rows``: the run's rows when the caller holds them (:class:`RunRows`); read otherwise.
    """
    run = registry.get_run(run_id)
    if run is None:
        raise RegistryError(f"run {run_id!r} is not in the registry at {registry.url}")
    config = run.config
    eval_tasks = _eval_task_names(run.tasks, config)
    if rows is None:
        rows = read_run_rows(registry, run_id)
    rounds, metrics = rows.rounds, rows.metrics
    n_eval = len(eval_tasks)
    federation_acc: dict[int, dict[int, float]] = defaultdict(dict)
    # What the accuracy matrices read, by site (None: the federation's), in order: the rows of
    # each task's last training round and the baselines. The matrices skip every other row, so
    # leaving them out here changes nothing but the time (30 sites x 19,000 rows, 200 rounds).
    last_of_task = last_round_of_task(rounds)
    matrix_rounds = set(last_of_task.values())
    by_site: dict[str | None, list[MetricInfo]] = defaultdict(list)
    for m in metrics:
        if m.server_round in matrix_rounds or m.name.startswith("baseline_"):
            by_site[m.site_id].append(m)
        if m.name != "accuracy" or m.site_id is not None:
            continue
        if m.server_round is not None and m.task_index is not None:
            federation_acc[m.server_round][m.task_index] = m.value
    matrix, baseline = accuracy_matrix(
        registry, run_id, num_eval_tasks=n_eval, metrics=by_site[None], last_of_task=last_of_task
    )
    zero_shot = _has_zero_shot(config)  # a last column of held-out classes (docs/DESIGN.md §11)
    summary = zero_shot_summary(matrix, baseline, has_zero_shot=zero_shot)
    if _is_joint(config):
        summary["bwt"] = summary["fwt"] = None  # a single training task has no transfer

    participations = rows.participations
    lost = lost_site_rounds(participations)
    privacy: dict[str, Any] = {}
    for row in sorted(rows.privacy, key=lambda r: (r.server_round or 0, r.id)):
        privacy[row.site_id] = {
            "epsilon": row.epsilon_run,
            "epsilon_lifetime": row.epsilon_lifetime,
            "delta": row.delta,
            "budget": row.budget,
        }
    by_site_parts: dict[str, list[ParticipationInfo]] = defaultdict(list)
    for p in participations:  # one pass, in order (not one scan of 12,000 rows per site)
        by_site_parts[p.site_id].append(p)
    sites: dict[str, Any] = {}
    for site in sorted(by_site_parts):
        ok_examples: list[int] = []
        failed: list[int] = []
        refused: list[int] = []
        errors: set[str] = set()
        for p in by_site_parts[site]:  # one pass over the site's rows (400 in 200 rounds)
            if p.status == "failed" and p.detail:
                errors.add(p.detail)
            if p.phase != "train":
                continue
            if p.status == "ok":
                ok_examples.append(p.num_examples)
            elif p.status == "failed":
                failed.append(p.server_round)
            elif p.status == "refused":
                refused.append(p.server_round)
        site_matrix, site_baseline = accuracy_matrix(
            registry, run_id, site_id=site, num_eval_tasks=n_eval,
            metrics=by_site.get(site, []), last_of_task=last_of_task,
        )  # fmt: skip
        sites[site] = {
            "rounds_trained": len(ok_examples),
            "failed_rounds": sorted(failed),
            "refused_rounds": sorted(refused),
            "examples": max(ok_examples, default=0),
            "examples_total": sum(ok_examples),
            "errors": sorted(errors),
            "accuracy_matrix": site_matrix,
            "baseline_accuracy": site_baseline,
            **zero_shot_summary(site_matrix, site_baseline, has_zero_shot=zero_shot),
            **privacy.get(site, {"epsilon": None, "epsilon_lifetime": None, "delta": None}),
        }

    return {
        "version": RESULTS_VERSION,
        "run_id": run.id,
        "scenario": run.scenario,
        "status": run.status,
        "reason": run.reason,
        "config": config,
        "tasks": run.tasks,
        "eval_tasks": eval_tasks,
        "accuracy_matrix": matrix,
        "baseline_accuracy": baseline,
        **summary,
        "evaluation": _evaluation(registry, run_id, config, n_eval, last_of_task, by_site[None]),
        "lost_site_rounds": lost.to_dict(),
        "lost_site_rounds_summary": lost.describe(),
        # Drift (docs/DESIGN.md §12): why each task began, and the reports that alerted.
        "task_starts": [
            {
                "task": t.task_index,
                "server_round": t.server_round,
                "trigger": t.trigger,
                "reason": t.reason,
            }
            for t in registry.list_task_starts(run_id)
        ],  # fmt: skip
        "drift_alerts": [
            {
                "server_round": e.server_round,
                "site": e.site_id,
                "score": e.score,
                "rate_shift": e.rate_shift,
                "rate_alert": e.rate_alert,
            }
            for e in registry.list_drift(run_id)
            if e.alert or e.rate_alert
        ],  # fmt: skip
        "sites": sites,
        "he": he_block(config, rounds, metrics),
        "upload_bytes_per_site": upload_bytes_per_site(
            [
                {"kind": r.kind, "participants": r.num_participants, "bytes_up": r.bytes_up}
                for r in rounds
            ]
        ),
        "rounds": [
            {
                "task": r.task_index,
                "round": r.round_in_task,
                "server_round": r.server_round,
                "kind": r.kind,
                "status": r.status,
                "seconds": r.seconds,
                "participants": r.num_participants,
                "failures": r.num_failures,
                "refusals": r.num_refusals,
                "bytes_up": r.bytes_up,
                "bytes_down": r.bytes_down,
                "accuracy": [federation_acc[r.server_round].get(j) for j in range(len(eval_tasks))],
            }
            for r in rounds
        ],
        "wall_seconds": wall_seconds,
    }


def _evaluation(
    registry: Registry,
    run_id: str,
    config: dict,
    num_eval_tasks: int,
    last_of_task: dict[int, int],
    federation: Sequence[MetricInfo],
) -> dict[str, Any]:
    """How the accuracy matrix was measured: exact counts, or DP-noised (with the noise)."""
    from fedcl.privacy.dp.counts import count_noise_sd

    dp = config.get("dp", {})
    mode = dp.get("evaluation", "noised") if dp.get("enabled") else "clear"
    out: dict[str, Any] = {"mode": mode}
    if mode == "noised":
        sigma = float(dp.get("evaluation_noise_multiplier", 0.0))
        sd, baseline_sd = accuracy_matrix(
            registry, run_id, num_eval_tasks=num_eval_tasks, metric="accuracy_noise_sd",
            metrics=federation, last_of_task=last_of_task,
        )  # fmt: skip
        out.update(
            noise_multiplier=sigma,
            count_noise_sd=count_noise_sd(sigma),  # on each site's correct and count, per task
            accuracy_noise_sd=sd,  # beside accuracy_matrix, cell by cell
            baseline_accuracy_noise_sd=baseline_sd,
        )
    return out


def _eval_task_names(train_tasks: list[str], config: dict) -> list[str]:
    """Joint runs train on one task but report on every task of the sequence; held-out
    classes add a zero-shot column."""
    if not _is_joint(config) and not _has_zero_shot(config):
        return list(train_tasks)
    from fedcl.config import ExperimentConfig
    from fedcl.continual.tasks import experiment_stream
    from fedcl.datasets.info import dataset_info

    experiment = ExperimentConfig.model_validate(config)
    stream = experiment_stream(experiment, dataset_info(experiment.data, experiment.seed))
    return [t.name for t in stream.evaluation_tasks]


def _has_zero_shot(config: dict) -> bool:
    from fedcl.datasets.captions import CAPTIONED_DATASETS

    data = config.get("data", {})
    return data.get("dataset") in CAPTIONED_DATASETS and data.get("options", {}).get(
        "zero_shot", True
    )


def _is_joint(config: dict) -> bool:
    return config.get("stream") == "joint" or config.get("continual", {}).get("method") == "joint"


def he_block(
    config: dict, rounds: Sequence[RoundInfo], metrics: Sequence[MetricInfo]
) -> dict[str, Any]:
    """What encryption cost on this run's real rounds (docs/DESIGN.md §5).

    Bytes per parameter are measured: a training round's bytes up over (sites that trained ×
    the model's values), and down over (sites sent × values), from the second round on (round
    1 sends the plaintext initial model). Under EWC the downlink also carries the Fisher and
    its anchor. Seconds per round: the sites' mean to decrypt what they were sent and to
    encrypt their update, and the coordinator's to sum the ciphertexts.
    """
    he = config.get("he", {})
    if not he.get("enabled"):
        return {"enabled": False}
    from fedcl.config.experiment import HESpec
    from fedcl.privacy.ckks.packing import bytes_per_parameter, packing_for

    packing = packing_for(HESpec.model_validate(he))
    size = next((m.value for m in metrics if m.name == "model_parameters"), None)
    per_round: dict[int, dict[str, float]] = defaultdict(dict)
    names = {
        "he_encrypt_seconds": "encrypt_s",
        "he_decrypt_seconds": "decrypt_s",
        "aggregate_seconds": "aggregate_s",
    }
    for m in metrics:
        if m.name in names and m.server_round is not None and m.site_id is None:
            per_round[m.server_round][names[m.name]] = m.value
    rows = []
    for r in rounds:
        if r.kind != "train" or r.status != "completed":
            continue
        row: dict[str, Any] = {"server_round": r.server_round, **per_round.get(r.server_round, {})}
        if size and r.num_participants:
            row["bytes_per_param_up"] = r.bytes_up / (r.num_participants * size)
            sent = r.num_participants + r.num_failures + r.num_refusals
            if r.server_round > 1:
                row["bytes_per_param_down"] = r.bytes_down / (sent * size)
        rows.append(row)

    def mean(key: str) -> float | None:
        values = [row[key] for row in rows if key in row]
        return sum(values) / len(values) if values else None

    up = mean("bytes_per_param_up")
    return {
        "enabled": True,
        "ckks": _ckks_parameters(he.get("public_context")),
        "packing": {
            "bits": packing.bits,
            "values_per_slot": packing.values_per_slot,
            "max_sites": packing.max_sites,
            "clip": packing.clip,
            "bytes_per_param": bytes_per_parameter(packing),
        },
        "model_parameters": int(size) if size else None,
        "bytes_per_param_up": up,
        "bytes_per_param_down": mean("bytes_per_param_down"),
        "fp32_ratio_up": up / 4 if up is not None else None,
        "seconds_per_round": {
            "encrypt": mean("encrypt_s"),
            "aggregate": mean("aggregate_s"),
            "decrypt": mean("decrypt_s"),
        },
        "rounds": rows,
    }


def _ckks_parameters(public_context: str | None) -> dict[str, Any] | None:
    """N and the coefficient modulus of the run's key set, read from its public context."""
    if not public_context:
        return None
    try:
        from fedcl.privacy.ckks.keys import load_public_context
        from fedcl.privacy.ckks.params import params_of

        params = params_of(load_public_context(public_context))
    except Exception:  # the dashboard's host may not hold the key file: say nothing, not fail
        return None
    return {
        "poly_modulus_degree": params.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
        "slots": params.slots,
    }
