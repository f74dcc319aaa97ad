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
    # Counts in clear, so the accuracy asserted is the model's: noised counts at the default
    # σ on a few dozen test examples per site and task swamp it (tests/test_private_evaluation.py).
    exp = load_scenario("digits-domain-il", [*SMALL, "dp.epsilon=8", 'dp.evaluation="clear"'])[1]
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
    # Sequential: every task's rounds compose (in parallel each task starts a cell of its own).
    exp = load_scenario(
        "digits-domain-il", [*SMALL, "dp.noise_multiplier=1.0", 'dp.composition="sequential"']
    )[1]
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


# --- DP that fits each site (issue 12) ---------------------------------------------------------
#: 3 sites, 2 tasks, batch 128: site-0's first task (102 examples) and site-2's second (27) are
#: smaller than the batch; each used to fail every round ("batch_size 128 >= 102 ... q = 1.0").
FITS = [*SMALL, "data.num_tasks=2", "data.partition.alpha=0.1", "train.batch_size=128"]


def _dp_sgd(ledger: PrivacyLedger, run_id: str) -> dict[int, object]:
    return {e.server_round: e for e in ledger.entries(run_id=run_id) if e.mechanism == "dp-sgd"}


def test_small_tasks_get_their_own_plan_and_only_one_no_plan_fits_is_refused(tmp_path) -> None:
    """site-0's 102 examples train at q = 1/2 (expected batch 51); site-2's 27 would give 13.5,
    below dp.min_expected_batch = 20: that task is refused at that site, the run says so."""
    exp = load_scenario("digits-domain-il", [*FITS, "dp.epsilon=8", "dp.min_expected_batch=20"])[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
        run = reg.get_run(opts.run_id)
        refused = [p for p in reg.list_participations(opts.run_id) if p.status == "refused"]
    small = _dp_sgd(PrivacyLedger(tmp_path / "sites" / "site-0"), opts.run_id)[1]
    assert (small.sample_rate, small.steps) == (0.5, 4)  # 2 draws × 2 local epochs, charged
    for site, s in results["sites"].items():
        assert not s["failed_rounds"], (site, s["errors"])
        assert 7.5 <= s["epsilon"] <= 8.0 + 1e-6, (site, s["epsilon"])  # planned at its sizes
    # Only site-2's second round; nothing else is lost, and nothing was charged for it.
    assert [(p.site_id, p.server_round) for p in refused] == [("site-2", 2)]
    assert refused[0].detail.startswith("no DP-SGD plan for task 1 at this site")
    assert "expected batch of 13.5" in refused[0].detail
    assert sorted(_dp_sgd(PrivacyLedger(tmp_path / "sites" / "site-2"), opts.run_id)) == [1]
    assert [results["sites"][s]["rounds_trained"] for s in ("site-0", "site-1", "site-2")] == [
        2,
        2,
        1,
    ]
    assert results["lost_site_rounds"] == {
        "total": 1, "site_rounds": 6, "failed": 0, "refused": 1, "rejected": 0,
        "reasons": {"refused: dp.min_expected_batch": 1}, "sites": {"site-2": 1},
    }  # fmt: skip
    assert run.status == "completed"  # the schedule finished, but not as a plain success:
    assert run.reason == "1 of 6 site-rounds lost: 1 refused (dp.min_expected_batch ×1)"
    from rich.console import Console

    from fedcl.simulations.report import print_report

    console = Console(record=True, width=200)
    print_report(results, console)
    last = console.export_text().strip().splitlines()[-1]
    assert last == "not a plain success: " + run.reason


def test_a_task_with_one_example_trains_and_is_charged(tmp_path) -> None:
    """Class-IL at α = 0.02: site-2 holds one example of task 0. By default it trains that task
    at q = 1/2 (two draws, one expected empty) and its ledger is charged; no site-round is lost.
    ``digits-many-sites`` and ``digits-vl`` under ``--set dp.epsilon=8`` lost 832 / 1,000 and
    3 / 75 site-rounds this way while the floor was one expected example."""
    over = [*SMALL, "dp.epsilon=8", "data.partition.alpha=0.02", "data.partition.seed=0"]
    exp = load_scenario("digits-class-il", over)[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
        run = reg.get_run(opts.run_id)
    tiny = _dp_sgd(PrivacyLedger(tmp_path / "sites" / "site-2"), opts.run_id)[1]
    assert (tiny.sample_rate, tiny.steps) == (0.5, 2 * exp.train.local_epochs)
    assert results["lost_site_rounds"]["total"] == 0, results["lost_site_rounds"]
    assert run.reason is None or "lost" not in run.reason
    assert 0 < results["sites"]["site-2"]["epsilon"] <= 8.0 + 1e-6


def test_a_sites_physical_batch_bounds_each_pass_and_changes_no_charge(tmp_path, monkeypatch):
    """``simulation.max_physical_batch`` reaches every site.toml; each site's DP-SGD draws then
    go through Opacus' BatchSplittingSampler in passes of at most that many examples, and the
    ledgers hold exactly the releases of the same run without it (same σ, q and steps)."""
    from opacus.utils.batch_memory_manager import BatchSplittingSampler

    passes: list[int] = []
    original = BatchSplittingSampler.__iter__

    def spy(self):  # records each pass, then yields it unchanged
        for chunk in original(self):
            passes.append(len(chunk))
            yield chunk

    monkeypatch.setattr(BatchSplittingSampler, "__iter__", spy)
    base = [*SMALL, "dp.epsilon=8", 'dp.evaluation="clear"']
    ledgers = {}
    for label, extra in (("whole", []), ("split", ["simulation.max_physical_batch=4"])):
        exp = load_scenario("digits-domain-il", [*base, *extra])[1]
        status, opts, _ = run_inprocess(exp, tmp_path / label)
        assert status == "completed"
        site0 = (tmp_path / label / "sites" / "site-0.toml").read_text()
        assert ("max_physical_batch = 4" in site0) == (label == "split")
        ledgers[label] = {
            site: [e.release for e in PrivacyLedger(tmp_path / label / "sites" / site).entries()]
            for site in ("site-0", "site-1", "site-2")
        }
        if label == "whole":
            assert passes == []  # no site split a draw
    assert ledgers["split"] == ledgers["whole"]
    draws = sum(r.steps for releases in ledgers["split"].values() for r in releases)
    assert passes and max(passes) <= 4
    assert len(passes) > 2 * draws  # draws of ~20-30 examples went through in several passes
