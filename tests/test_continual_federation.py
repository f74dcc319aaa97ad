"""Federated EWC and replay through the real apps (in-process), compared with naive FedAvg."""

from __future__ import annotations

import pytest
from federation_helpers import run_inprocess

from fedcl.config import ConfigError
from fedcl.server.observers import RunObserver
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.catalog import load_scenario


def _results(tmp_path, scenario: str, *overrides: str, **kwargs) -> dict:
    exp = load_scenario(scenario, list(overrides))[1]
    status, opts, _ = run_inprocess(exp, tmp_path, **kwargs)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        return build_results(reg, opts.run_id)


def test_ewc_forgets_less_than_naive_on_domain_il(tmp_path) -> None:
    naive = _results(tmp_path / "naive", "digits-domain-il")
    ewc = _results(tmp_path / "ewc", "digits-domain-il", 'continual.method="ewc"')
    assert ewc["bwt"] > naive["bwt"] + 0.02, (ewc["bwt"], naive["bwt"])
    assert ewc["avg_accuracy"] > 0.75
    kinds = [r["kind"] for r in ewc["rounds"]]
    assert kinds.count("consolidate") == 4  # one per task but the last


def test_replay_rescues_class_il(tmp_path) -> None:
    naive = _results(tmp_path / "naive", "digits-class-il")
    replay = _results(tmp_path / "replay", "digits-class-il", 'continual.method="replay"')
    assert naive["avg_accuracy"] < 0.35  # class-IL fine-tuning forgets all but the last pair
    assert replay["avg_accuracy"] >= 0.80, replay["accuracy_matrix"]


def test_site_offline_for_a_whole_task_rejoins_with_the_current_memory(tmp_path) -> None:
    exp = load_scenario(
        "digits-domain-il",
        ["simulation.num_sites=3", "min_sites=2", 'continual.method="ewc"', "data.num_tasks=5"],
    )[1]
    holder: dict = {}

    class Offline(RunObserver):
        """site-2 misses task 1 entirely (its training and the consolidation)."""

        def round_finished(self, summary) -> None:
            grid = holder["grid"]
            if summary.task_index == 0 and summary.round_in_task == 2:
                grid.offline.add(1002)
            if summary.task_index == 1 and summary.round_in_task == 2:
                grid.offline.discard(1002)

    from fedcl.client.app import app as client_app
    from fedcl.server.coordinator import Coordinator, CoordinatorOptions
    from fedcl.simulations.local_grid import LocalGrid
    from fedcl.simulations.runner import write_site_configs

    write_site_configs(exp, tmp_path / "sites")
    grid = LocalGrid(client_app, 3)
    holder["grid"] = grid
    opts = CoordinatorOptions(
        experiment=exp,
        registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
        run_id="offline",
        sites_dir=str(tmp_path / "sites"),
        observers=(Offline(),),
    )
    assert Coordinator(grid, opts).run() == "completed"
    with Registry.open(opts.registry_url) as reg:
        parts = reg.list_participations("offline", site_id="site-2")
        rounds = {r.server_round: r for r in reg.list_rounds("offline")}
        agreement = [
            m
            for m in reg.list_metrics("offline", name="ewc-digest-agreement")
            if rounds[m.server_round].task_index >= 2
        ]
        mismatches = [a for a in reg.list_audit(run_id="offline") if a.kind == "ewc.mismatch"]
    task1 = [p for p in parts if rounds[p.server_round].task_index == 1 and p.phase == "train"]
    later = [p for p in parts if rounds[p.server_round].task_index >= 2 and p.phase == "train"]
    assert not any(p.status == "ok" for p in task1)  # it really missed task 1
    assert later and all(p.status == "ok" for p in later)  # and trained again afterwards
    assert agreement and all(m.value == 1.0 for m in agreement)  # with the same EWC memory
    assert not mismatches


def test_bad_continual_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="continual.ewc_lambda"):
        load_scenario("digits-domain-il", ["continual.ewc_lambda=-1"])
    with pytest.raises(ConfigError, match="continual.ewc_gamma"):
        load_scenario("digits-domain-il", ["continual.ewc_gamma=1.5"])
    exp = load_scenario(
        "digits-class-il",
        [
            "simulation.num_sites=3",
            "train.rounds_per_task=1",
            'continual.method="replay"',
            "continual.replay_size=5000",
        ],
    )[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "failed"  # every site refuses: the buffer would exceed its data
    with Registry.open(opts.registry_url) as reg:
        run = reg.get_run(opts.run_id)
    assert "continual.replay_size" in run.reason and "site-0" in run.reason
