"""Whole federations through the real ServerApp and ClientApp, in-process (LocalGrid).

These cover the behaviour; test_simulate_ray.py and test_deployment.py run the same apps through
Flower's Ray engine and a real SuperLink with SuperNodes.
"""

from __future__ import annotations

import json

import pytest
from federation_helpers import run_inprocess, small_experiment

from fedcl.config import protocol as P
from fedcl.server.observers import RunObserver
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.local_grid import ERROR_CLIENT_APP_RAISED


def test_small_federation_learns_and_records(tmp_path) -> None:
    exp = small_experiment()
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
        rounds = reg.list_rounds(opts.run_id)
        versions = reg.list_model_versions(opts.run_id)
    assert [r.server_round for r in rounds] == [1, 2, 3, 4, 5]
    assert all(r.num_participants == 3 and r.bytes_up > 0 and r.bytes_down > 0 for r in rounds)
    assert len(versions) == 5 and all(len(v.sha256) == 64 for v in versions)
    # Split-Digits domain-IL: 2 outputs, chance = 0.5. Each task is learnt when it is trained.
    r = results["accuracy_matrix"]
    assert len(r) == 5 and all(r[i][i] > 0.8 for i in range(5))
    assert results["avg_accuracy"] > 0.6
    assert results["bwt"] is not None and results["fwt"] is not None
    assert set(results["sites"]) == {"site-0", "site-1", "site-2"}
    assert all(s["rounds_trained"] == 5 for s in results["sites"].values())
    json.dumps(results)  # the contract is plain JSON


def test_crashing_site_is_recorded_and_round_goes_on(tmp_path) -> None:
    exp = small_experiment()

    def crash_site1_in_round2(node_id, msg, context):
        cfg = msg.content[P.CONFIG]
        if node_id == 1001 and msg.metadata.message_type == "train" and cfg[P.SERVER_ROUND] == 2:
            raise RuntimeError("GPU fell off the bus")
        return None

    status, opts, _ = run_inprocess(exp, tmp_path, intercept=crash_site1_in_round2)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        rounds = reg.list_rounds(opts.run_id)
        parts = reg.list_participations(opts.run_id, site_id="site-1")
    assert rounds[1].num_participants == 2 and rounds[1].num_failures == 1
    failed = [p for p in parts if p.status == "failed"]
    # Round 2's train message also carried the evaluation of round 1's model: both failed.
    assert sorted((p.server_round, p.phase) for p in failed) == [(1, "evaluate"), (2, "train")]
    assert all("GPU fell off the bus" in p.detail for p in failed)
    assert all(str(ERROR_CLIENT_APP_RAISED) in p.detail for p in failed)


def test_missing_data_folder_fails_that_site_with_its_path(tmp_path) -> None:
    exp = small_experiment()
    from fedcl.simulations.runner import write_site_configs

    write_site_configs(exp, tmp_path / "sites")
    broken = tmp_path / "sites" / "site-2.toml"
    text = broken.read_text().replace(
        'source = "builtin"', 'source = "folder"\npath = "/no/such/folder"'
    )
    broken.write_text(text)
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"  # the other two sites carry the run
    with Registry.open(opts.registry_url) as reg:
        parts = reg.list_participations(opts.run_id, site_id="site-2")
    assert parts and all(p.status == "failed" for p in parts)
    assert all("site-2" in p.detail or "folder" in p.detail for p in parts)


def test_no_site_can_train_ends_the_run_cleanly(tmp_path) -> None:
    exp = small_experiment()

    def everyone_crashes(node_id, msg, context):
        if msg.metadata.message_type == "train":
            raise RuntimeError("disk full")
        return None

    status, opts, _ = run_inprocess(exp, tmp_path, intercept=everyone_crashes)
    assert status == "failed"
    with Registry.open(opts.registry_url) as reg:
        run = reg.get_run(opts.run_id)
    assert "no site returned an update" in run.reason and "disk full" in run.reason


class _StopAfter(RunObserver):
    def __init__(self, rounds: int):
        self.rounds = rounds

    def round_finished(self, summary) -> None:
        if summary.server_round == self.rounds:
            raise KeyboardInterrupt("coordinator killed")


def test_restarted_coordinator_resumes_after_last_completed_round(tmp_path, registry_url) -> None:
    exp = small_experiment()
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(exp, tmp_path, registry_url=registry_url, observers=[_StopAfter(2)])
    with Registry.open(registry_url) as reg:
        assert reg.get_run("test-run").status == "stopped"
        assert reg.last_completed_round("test-run").server_round == 2

    seen: list[int] = []

    class Record(RunObserver):
        def run_started(self, run_id, total, done):
            seen.append(-done)

        def round_finished(self, summary):
            seen.append(summary.server_round)

    status, _, _ = run_inprocess(exp, tmp_path, registry_url=registry_url, observers=[Record()])
    assert status == "completed"
    assert seen == [-2, 3, 4, 5]  # resumed after round 2, did not redo it
    with Registry.open(registry_url) as reg:
        rounds = reg.list_rounds("test-run")
        results = build_results(reg, "test-run")
    assert [r.server_round for r in rounds] == [1, 2, 3, 4, 5]
    assert results["accuracy_matrix"][4][4] > 0.8


def test_resume_with_a_changed_experiment_is_refused(tmp_path) -> None:
    exp = small_experiment()
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(exp, tmp_path, observers=[_StopAfter(1)])
    from fedcl.server.registry import RegistryError

    with pytest.raises(RegistryError, match="test-run"):
        run_inprocess(small_experiment("digits-domain-il", "train.lr=0.5"), tmp_path)


def test_joint_reference_and_task_il(tmp_path) -> None:
    exp = small_experiment("digits-task-il", "stream=joint")
    status, opts, _ = run_inprocess(exp, tmp_path)
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    assert status == "completed"
    assert len(results["accuracy_matrix"]) == 1 and len(results["eval_tasks"]) == 5
    assert results["avg_accuracy"] > 0.9 and results["bwt"] is None
