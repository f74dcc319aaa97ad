"""DP-SGD at every site through the real apps: ε per site, budgets, refusals."""

from __future__ import annotations

from federation_helpers import run_inprocess

from fedcl.privacy.ledger import PrivacyLedger
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import write_site_configs

SMALL = ["simulation.num_sites=3", "train.rounds_per_task=1", "dp.enabled=true"]


def test_target_epsilon_is_met_at_every_site(tmp_path) -> None:
    exp = load_scenario("digits-domain-il", [*SMALL, "dp.epsilon=8"])[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    for site, s in results["sites"].items():
        assert 0 < s["epsilon"] <= 8.0 + 1e-6, (site, s["epsilon"])
        # The registry holds what the site's own ledger says (the site accounts, we record).
        ledger = PrivacyLedger(tmp_path / "sites" / site)
        assert abs(ledger.epsilon(1e-5, run_id=opts.run_id) - s["epsilon"]) < 1e-9
    assert results["avg_accuracy"] > 0.5
    assert results["config"]["dp"]["epsilon"] == 8.0


def test_small_budget_site_refuses_and_the_run_goes_on(tmp_path) -> None:
    exp = load_scenario("digits-domain-il", [*SMALL, "dp.noise_multiplier=1.0"])[1]
    sites = tmp_path / "sites"
    write_site_configs(exp, sites)
    site0 = sites / "site-0.toml"
    site0.write_text(site0.read_text().replace("[privacy]", "[privacy]\nepsilon_budget = 10.0"))
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
        refusals = [
            p
            for p in reg.list_participations(opts.run_id, site_id="site-0")
            if p.status == "refused"
        ]
    s0 = results["sites"]["site-0"]
    assert 1 <= s0["rounds_trained"] < 5 and s0["refused_rounds"]  # trained k rounds, then no
    assert refusals and "privacy budget" in refusals[0].detail
    ledger = PrivacyLedger(sites / "site-0")
    assert ledger.epsilon(1e-5) <= 10.0  # never over budget
    assert s0["epsilon_lifetime"] == ledger.epsilon(1e-5)
    assert all(results["sites"][s]["rounds_trained"] == 5 for s in ("site-1", "site-2"))


def test_all_sites_refused_ends_the_run_cleanly(tmp_path) -> None:
    exp = load_scenario(
        "digits-domain-il",
        [*SMALL, "dp.noise_multiplier=0.5", "simulation.site_epsilon_budget=0.5"],
    )[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "stopped"
    with Registry.open(opts.registry_url) as reg:
        run = reg.get_run(opts.run_id)
    assert "every site refused" in run.reason and "site-0" in run.reason
