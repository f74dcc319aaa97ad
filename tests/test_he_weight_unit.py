"""A simulation's CKKS weight unit: its largest update count (runner.fit_weight_unit).

A site's encrypted weight is n / he.max_examples at a fixed quantisation step, so the error of
the average grows with the unit; a simulation can count its sites, so unless the experiment sets
a unit it uses the most examples any virtual site weights a round's update by: one task's
training set, plus the replay buffer when the method replays, or everything in joint training.
"""

from __future__ import annotations

import logging

import pytest
from federation_helpers import run_inprocess

from fedcl.client.site import load_site_data
from fedcl.config import SiteConfig, load_toml
from fedcl.privacy.ckks import packing_for
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import fit_weight_unit, prepare_keys, write_site_configs


def _fitted(tmp_path, *overrides: str):
    exp = load_scenario("digits-domain-il", list(overrides))[1]
    paths = write_site_configs(exp, tmp_path / "sites")
    data = [load_site_data(exp, load_toml(SiteConfig, p)) for p in paths]
    return exp, fit_weight_unit(exp, paths), data


def _largest_task(data) -> int:
    return max(len(d.train_set(k)) for d in data for k in range(d.stream.num_tasks))


def test_unit_is_the_largest_task_and_shrinks_the_error_bound(tmp_path) -> None:
    exp, fitted, data = _fitted(tmp_path, "he.enabled=true")
    assert exp.he.max_examples == 10_000
    largest = _largest_task(data)
    assert fitted.he.max_examples == largest < max(len(d.train.y) for d in data)
    # The bound on the error of the encrypted average (contributors · step · unit / Σn) shrinks
    # by the same factor; nothing else in the experiment changes.
    total = sum(len(d.train.y) for d in data)
    before, after = packing_for(exp.he), packing_for(fitted.he)
    assert after.error_bound(5, total) / before.error_bound(5, total) == pytest.approx(
        largest / 10_000
    )
    assert fitted.model_copy(update={"he": exp.he}) == exp


def test_replay_and_joint_training_weigh_more(tmp_path) -> None:
    _, replay, data = _fitted(tmp_path / "r", "he.enabled=true", 'continual.method="replay"')
    size = replay.continual.replay_size
    with_buffer = [
        len(d.train_set(k)) + (min(size, sum(len(d.train_set(j)) for j in range(k))))
        for d in data
        for k in range(d.stream.num_tasks)
    ]
    assert replay.he.max_examples == max(with_buffer) > _largest_task(data)
    _, joint, data = _fitted(tmp_path / "j", "he.enabled=true", 'continual.method="joint"')
    assert joint.he.max_examples == max(len(d.train.y) for d in data)


def test_a_unit_the_experiment_sets_is_kept_and_plaintext_runs_are_untouched(tmp_path) -> None:
    _, fitted, _ = _fitted(tmp_path / "set", "he.enabled=true", "he.max_examples=10000")
    assert fitted.he.max_examples == 10_000
    exp, fitted, _ = _fitted(tmp_path / "off")
    assert fitted is exp


def test_no_site_update_is_capped_at_the_fitted_unit(tmp_path, caplog) -> None:
    """Through the real apps, EWC + replay (a Fisher share and task ∪ buffer updates): no site
    weighs an update by more than the unit (the codec logs it when one does)."""
    exp = load_scenario(
        "digits-domain-il",
        [
            "he.enabled=true",
            "simulation.num_sites=3",
            "data.num_tasks=2",
            "train.rounds_per_task=1",
            "train.local_epochs=1",
            'continual.method="ewc+replay"',
        ],
    )[1]
    exp = prepare_keys(exp, tmp_path)
    exp = fit_weight_unit(exp, write_site_configs(exp, tmp_path / "sites"))
    assert exp.he.max_examples < 10_000
    with caplog.at_level(logging.WARNING, logger="fedcl.privacy.ckks"):
        status, _opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    assert not [r for r in caplog.records if "exceed he.max_examples" in r.getMessage()]
    # (With the unit one below what it fitted, a site is capped and says so.)
    lower = exp.model_copy(
        update={"he": exp.he.model_copy(update={"max_examples": exp.he.max_examples - 1})}
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedcl.privacy.ckks"):
        run_inprocess(lower, tmp_path / "lower")
    assert [r for r in caplog.records if "exceed he.max_examples" in r.getMessage()]


def test_the_ray_driver_counts_the_sites_then_drops_their_data(tmp_path, monkeypatch) -> None:
    """Fitting the unit reads every virtual site's data in the driver; under Ray the sites
    train in actors, so the driver lets go of that copy before the runtime starts (the
    in-process engine keeps it: its sites train in this process)."""
    from fedcl.client import site
    from fedcl.simulations import runner

    seen: dict[str, int] = {}

    class Started(Exception):
        pass

    def runtime_starts(options) -> None:
        seen["sites"] = len(site._SITE_DATA)
        seen["datasets"] = site._builtin.cache_info().currsize
        seen["unit"] = options.experiment.he.max_examples
        raise Started

    monkeypatch.setattr(runner, "_run_ray", runtime_starts)
    exp = load_scenario("digits-domain-il", ["he.enabled=true"])[1]
    plan = runner.SimulationPlan(exp, "digits-domain-il", tmp_path / "out", "r", engine="ray")
    with pytest.raises(Started):
        runner.run_plan(plan)
    assert seen == {
        "sites": 0,
        "datasets": 0,
        "unit": _fitted(tmp_path, "he.enabled=true")[1].he.max_examples,
    }
    assert seen["unit"] < 10_000  # the sites were counted before their data was dropped
