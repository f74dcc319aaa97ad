"""Parallel composition at the sites: each task's training data is its own cell, so each task's
σ is planned for ε alone; methods that reuse earlier tasks' records fall back to sequential;
a site's policy can forbid it. Real Opacus accountant, real apps (docs/DESIGN.md §9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from federation_helpers import run_inprocess, small_experiment

from fedcl.client.privacy_site import SitePlan, SitePrivacy
from fedcl.client.site import load_site_data
from fedcl.config import SiteConfig, load_toml
from fedcl.privacy.ledger import PrivacyLedger, compose_epsilon
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.runner import write_site_configs

EPS = 8.0
DP = ("dp.epsilon=8", "data.num_tasks=5")


def _privacy(tmp_path: Path, *extra: str, policy: str = "") -> SitePrivacy:
    exp = small_experiment("digits-domain-il", *DP, *extra)
    sites = tmp_path / "sites"
    if not sites.exists():
        write_site_configs(exp, sites)
    path = sites / "site-0.toml"
    if policy:
        path.write_text(path.read_text().replace("[privacy]", f"[privacy]\n{policy}"))
    site = load_toml(SiteConfig, path)
    return SitePrivacy(SitePlan(exp, site, load_site_data(exp, site)))


def _sequential_epsilon(privacy: SitePrivacy) -> float:
    """ε of every planned release composed in one sequence (what the site would spend
    without cells at the σ it plans)."""
    history = [
        (privacy.task_noise_multiplier(t.task), t.sample_rate, t.steps, t.group_size)
        for t in privacy.planned_tasks()
        if t.ok
    ]
    others = privacy.planned_fisher_releases() + privacy.planned_evaluation_releases()
    return compose_epsilon([*history, *others], privacy.delta)


@pytest.mark.parametrize("method", ["naive", "ewc", "lwf", "si"])
def test_each_task_is_planned_in_its_own_cell(tmp_path, method) -> None:
    parallel = _privacy(tmp_path, f'continual.method="{method}"')
    sequential = _privacy(tmp_path, f'continual.method="{method}"', 'dp.composition="sequential"')
    assert parallel.composition.parallel and not sequential.composition.parallel
    spend = parallel.planned_run_spend()
    assert EPS - 0.1 <= spend.epsilon <= EPS and spend.cell.startswith("train:task-")
    assert sequential.planned_run_epsilon() <= EPS
    assert _sequential_epsilon(parallel) > 2 * EPS  # the run as one sequence would be far over
    for t in parallel.planned_tasks():
        # Every task trains with less noise than the run's one sequential σ.
        assert parallel.task_noise_multiplier(t.task) < 0.75 * sequential.noise_multiplier
        # Its cell alone (its DP-SGD, its DP Fisher) lands at ≤ ε.
        cell = [(parallel.task_noise_multiplier(t.task), t.sample_rate, t.steps)]
        cell += [h for h in parallel.planned_fisher_releases()][t.task : t.task + 1]
        assert compose_epsilon(cell, parallel.delta) <= EPS + 1e-9


@pytest.mark.parametrize("method", ["replay", "ewc+replay", "joint"])
def test_methods_that_reuse_earlier_records_fall_back_to_sequential(tmp_path, method) -> None:
    privacy = _privacy(tmp_path, f'continual.method="{method}"')
    assert not privacy.composition.parallel
    assert method in privacy.composition.reason or "joint" in privacy.composition.reason
    sigmas = {privacy.task_noise_multiplier(t.task) for t in privacy.planned_tasks() if t.ok}
    assert len(sigmas) == 1  # one σ for the whole run, as before cells
    # ε is today's sequential composition of the whole run, all in the universal cell.
    assert privacy.planned_run_spend().cell == "*"
    assert privacy.planned_run_epsilon() == pytest.approx(_sequential_epsilon(privacy), rel=1e-9)


def test_a_site_policy_forbids_parallel_composition(tmp_path) -> None:
    privacy = _privacy(tmp_path, policy="allow_parallel_composition = false")
    assert not privacy.composition.parallel
    assert "privacy.allow_parallel_composition" in privacy.composition.reason
    assert privacy.planned_run_epsilon() == pytest.approx(_sequential_epsilon(privacy), rel=1e-9)


def test_a_bad_composition_setting_names_the_field(tmp_path) -> None:
    from fedcl.config import ConfigError

    with pytest.raises(ConfigError, match="dp.composition"):
        small_experiment("digits-domain-il", 'dp.composition="both"')
    exp = small_experiment("digits-domain-il")
    write_site_configs(exp, tmp_path)
    path = tmp_path / "site-0.toml"
    bad = '[privacy]\nallow_parallel_composition = "maybe"'
    path.write_text(path.read_text().replace("[privacy]", bad))
    with pytest.raises(ConfigError, match="privacy.allow_parallel_composition"):
        load_toml(SiteConfig, path)


def test_a_dp_federation_spends_each_cell_within_the_budget(tmp_path) -> None:
    """Each site's run ε (the worst cell) ≤ dp.epsilon while its releases, composed as one
    sequence, are far over it: the cells are what the site spends by; the registry agrees."""
    exp = small_experiment("digits-domain-il", *DP, 'dp.evaluation="noised"')
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    assert results["lost_site_rounds"]["total"] == 0
    seq_exp = small_experiment("digits-domain-il", *DP, 'dp.composition="sequential"')
    for site, s in results["sites"].items():
        ledger = PrivacyLedger(tmp_path / "sites" / site)
        entries = ledger.entries(run_id=opts.run_id)
        spend = ledger.spend(exp.dp.delta, run_id=opts.run_id)
        assert 0 < spend.epsilon <= EPS + 1e-9 and spend.epsilon == s["epsilon"], site
        assert compose_epsilon([e.release.history for e in entries], exp.dp.delta) > 1.5 * EPS
        training = [e for e in entries if e.mechanism == "dp-sgd"]
        assert [e.cells for e in training] == [(f"train:task-{k}",) for k in range(5)]
        evaluations = [e for e in entries if e.mechanism == "dp-evaluation"]
        assert evaluations and all(e.cells[0] == "test:task-0" for e in evaluations)
        config = load_toml(SiteConfig, tmp_path / "sites" / f"{site}.toml")
        before = SitePrivacy(SitePlan(seq_exp, config, load_site_data(seq_exp, config)))
        assert all(e.noise_multiplier < 0.75 * before.noise_multiplier for e in training)


def test_a_replay_federation_composes_in_sequence(tmp_path) -> None:
    """Replay trains task 1 on task 0's records: every release is universal, and each site's
    ε is the sequential composition of its whole run (as before cells)."""
    exp = small_experiment(
        "digits-domain-il", "dp.epsilon=8", "data.num_tasks=2", 'continual.method="replay"'
    )
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    for site, s in results["sites"].items():
        ledger = PrivacyLedger(tmp_path / "sites" / site)
        entries = ledger.entries(run_id=opts.run_id)
        assert entries and all(e.cells == ("*",) for e in entries)
        sequential = compose_epsilon([e.release.history for e in entries], exp.dp.delta)
        assert s["epsilon"] == ledger.epsilon(exp.dp.delta) == pytest.approx(sequential, rel=1e-12)
        assert 7.0 < s["epsilon"] <= EPS + 1e-9
        # the replayed task is charged at group size 2 (its buffer), as before cells
        assert [e.group_size for e in entries if e.mechanism == "dp-sgd"] == [1, 2]
