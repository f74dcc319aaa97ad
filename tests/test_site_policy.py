"""The site's own privacy policy (site.toml ``[privacy]``), which no experiment overrides.

A site that requires DP refuses an experiment with DP off (training, consolidation and
evaluation), one below its least σ, and the round that would take a run past its most ε per
run; a refused round is paid for with nothing. And what leaves a site under DP + HE: no reply
lets the coordinator compute a site's training-set size (docs/DESIGN.md §9).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from federation_helpers import run_inprocess, small_experiment

from fedcl.cli.main import main
from fedcl.config import PrivacyPolicy, SiteConfig, load_toml, write_toml
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.ledger import PrivacyLedger, compose_epsilon
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.runner import write_site_configs

TWO_TASKS = ("data.num_tasks=2",)

#: The metadata beside an encrypted record (``fedcl.privacy.ckks.wire``): format and kind, the
#: key set's fingerprint, the model's layout hash, its number of values and of blocks, and the
#: packing (slots, bits, values per slot, he.max_sites, clip, he.max_examples, spill bits,
#: scale), and the SHA-256 of the model the site trained from. None of it depends on the
#: site's data.
CKKS_META = {
    "ckks-format", "ckks-kind", "ckks-fingerprint", "ckks-layout", "ckks-values", "ckks-blocks",
    "ckks-blocks-per-array", "ckks-slots", "ckks-bits", "ckks-values-per-slot", "ckks-max-sites",
    "ckks-clip", "ckks-max-examples", "ckks-spill-bits", "ckks-scale-bits", "ckks-base",
}  # fmt: skip


def _set_policy(sites: Path, index: int, lines: str) -> None:
    path = sites / f"site-{index}.toml"
    text = path.read_text()
    assert text.count("\n[privacy]\n") == 1
    path.write_text(text.replace("\n[privacy]\n", f"\n[privacy]\n{lines}\n"))


def _participations(url: str, run_id: str, site: str, phase: str):
    with Registry.open(url) as reg:
        return [p for p in reg.list_participations(run_id, site_id=site) if p.phase == phase]


# --- the policy itself ---------------------------------------------------------------------------
def test_require_dp_defaults_to_true_with_a_budget_and_false_without(tmp_path) -> None:
    assert PrivacyPolicy().require_dp is False
    assert PrivacyPolicy(epsilon_budget=1.0).require_dp is True
    assert PrivacyPolicy(min_noise_multiplier=1.0).require_dp is True  # no noise < any least σ
    assert PrivacyPolicy(max_epsilon_per_run=2.0).require_dp is True  # DP off: ε = ∞
    assert PrivacyPolicy(epsilon_budget=1.0, require_dp=False).require_dp is False  # explicit
    assert PrivacyPolicy(require_dp=True).require_dp is True
    # A site.toml written without a budget does not pin require_dp = false: given a budget by
    # hand later, the site requires DP.
    site = SiteConfig(site_id="s", state_dir=tmp_path / "s")
    path = write_toml(site, tmp_path / "site.toml")
    assert "require_dp =" not in path.read_text()
    path.write_text(path.read_text().replace("[privacy]\n", "[privacy]\nepsilon_budget = 1.0\n"))
    assert load_toml(SiteConfig, path).privacy.require_dp is True
    explicit = {"epsilon_budget": 1.0, "require_dp": False}  # not the default: written
    explicit = SiteConfig(site_id="s", state_dir=tmp_path / "s", privacy=explicit)
    assert "require_dp = false" in write_toml(explicit, tmp_path / "b.toml").read_text()
    assert load_toml(SiteConfig, tmp_path / "b.toml").privacy.require_dp is False
    with pytest.raises(Exception, match="min_noise_multiplier"):
        PrivacyPolicy(min_noise_multiplier=0)


# --- in-process federations ----------------------------------------------------------------------
def test_a_site_that_requires_dp_refuses_an_experiment_without_dp(tmp_path) -> None:
    exp = small_experiment("digits-domain-il", *TWO_TASKS)
    assert not exp.dp.enabled
    sites = tmp_path / "sites"
    write_site_configs(exp, sites)
    _set_policy(sites, 0, "epsilon_budget = 5.0")  # a budget: require_dp defaults to true
    status, opts, _ = run_inprocess(exp, tmp_path)
    # The other sites train every round, so the run completes; the refusals are recorded per
    # site and round (results' refused_rounds, participations with the rule), and the run's
    # reason says it is not a plain success (issue 12: it used to say nothing).
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        run = reg.get_run(opts.run_id)
        results = build_results(reg, opts.run_id)
    assert run.status == "completed"
    assert run.reason == "2 of 6 site-rounds lost: 2 refused (privacy.require_dp ×2)"
    assert results["lost_site_rounds"]["reasons"] == {"refused: privacy.require_dp": 2}
    s0 = results["sites"]["site-0"]
    assert s0["rounds_trained"] == 0 and s0["refused_rounds"] == [1, 2]
    assert all(results["sites"][s]["rounds_trained"] == 2 for s in ("site-1", "site-2"))
    rule = "site policy privacy.require_dp: the experiment has DP off"
    train = _participations(opts.registry_url, opts.run_id, "site-0", "train")
    assert train and all(p.status == "refused" and p.detail.startswith(rule) for p in train)
    # Evaluation sends per-task counts and losses in clear: refused too, with the same rule.
    evaluation = _participations(opts.registry_url, opts.run_id, "site-0", "evaluate")
    assert evaluation and all(p.status == "refused" for p in evaluation)
    assert all(p.detail.startswith(rule) and p.num_examples == 0 for p in evaluation)
    assert PrivacyLedger(sites / "site-0").entries() == []  # nothing charged


def test_least_sigma_and_most_epsilon_per_run(tmp_path) -> None:
    """site-0 refuses σ = 0.7 < 1.0; site-1 trains until its run would pass its cap."""
    from fedcl.client.site import load_site_data
    from fedcl.privacy.dp import planned_release

    exp = small_experiment(
        "digits-domain-il",
        *TWO_TASKS,
        "train.rounds_per_task=2",
        "dp.noise_multiplier=0.7",
        'dp.evaluation="withheld"',  # only training spends here (noised evaluation: issue 12)
        # tasks 0 and 1 compose (in parallel, task 1 would start a cell of its own)
        'dp.composition="sequential"',
    )
    sites = tmp_path / "sites"
    write_site_configs(exp, sites)
    # site-1's cap: between what its first two rounds (task 0) and a third (task 1) spend.
    site1 = load_toml(SiteConfig, sites / "site-1.toml")
    data = load_site_data(exp, site1)
    train = exp.train
    release = [
        planned_release(len(data.train_set(k)), train.batch_size, train.local_epochs, 0.7, 1e-5)
        for k in (0, 1)
    ]
    eps2 = compose_epsilon([release[0].history] * 2, 1e-5, "rdp")
    eps3 = compose_epsilon([release[0].history] * 2 + [release[1].history], 1e-5, "rdp")
    cap = round((eps2 + eps3) / 2, 3)
    assert eps2 < cap < eps3
    _set_policy(sites, 0, "min_noise_multiplier = 1.0")
    _set_policy(sites, 1, f"max_epsilon_per_run = {cap}")
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    assert results["sites"]["site-2"]["rounds_trained"] == 4

    s0 = results["sites"]["site-0"]
    assert s0["rounds_trained"] == 0 and s0["refused_rounds"] == [1, 2, 3, 4]
    for p in _participations(opts.registry_url, opts.run_id, "site-0", "train"):
        assert p.detail == (
            "site policy privacy.min_noise_multiplier = 1.0: the experiment's σ would be 0.7 "
            "(dp.noise_multiplier)"
        )
    assert PrivacyLedger(sites / "site-0").entries() == []

    s1 = results["sites"]["site-1"]
    assert s1["rounds_trained"] == 2 and s1["refused_rounds"] == [3, 4]  # the ones before pass
    refused = [
        p
        for p in _participations(opts.registry_url, opts.run_id, "site-1", "train")
        if p.status == "refused"
    ]
    expected = (
        f"site policy privacy.max_epsilon_per_run = {cap}: this round would bring the run to "
        f"ε = {eps3:.3g} at δ=1e-05 (spent in this run so far: {eps2:.3g})"
    )
    assert [p.detail for p in refused] == [expected, expected]  # round 3 was not charged
    ledger = PrivacyLedger(sites / "site-1")
    assert [e.server_round for e in ledger.entries()] == [1, 2]  # nothing for rounds 3 and 4
    assert ledger.epsilon(1e-5, run_id=opts.run_id) == pytest.approx(eps2) and eps2 <= cap


def test_no_reply_under_dp_and_he_reveals_a_sites_training_set_size(tmp_path) -> None:
    """Every reply of a DP + HE + EWC run, read as the coordinator gets it."""
    from fedcl.client.app import app
    from fedcl.client.site import load_site_data
    from fedcl.simulations.runner import prepare_keys

    exp = small_experiment(
        "digits-domain-il",
        *TWO_TASKS,
        "dp.epsilon=8",
        "he.enabled=true",
        "continual.method=ewc",
        "simulation.site_epsilon_budget=50",
    )
    exp = prepare_keys(exp, tmp_path)
    replies: list[tuple[str, object]] = []

    def spy(node_id, msg, context):
        reply = app(msg, context)
        replies.append((msg.metadata.message_type, reply))
        return reply

    status, opts, _ = run_inprocess(exp, tmp_path, intercept=spy)
    assert status == "completed"

    # What a train or consolidation reply may carry, and why none of it is a count:
    allowed_metrics = {
        P.DP_EPSILON_RUN,  # ε this run spent at the site: its ledger's word, which the registry
        P.DP_EPSILON_LIFETIME,  # records; a function of (σ, q = 1/ceil(N/B), steps) with σ
        P.DP_DELTA,  # planned from the same N, so not N itself (ceil(N/B) at most, see the
        P.DP_BUDGET,  # report); δ and the budget are the site's own settings
        "ckks-clipped-fraction",  # share of the *model's* values beyond the quantiser's clip,
        # counted before the weighting by N: a property of the weights
        "ckks-encrypt-seconds",  # time to encrypt a fixed-size model
        P.HE_DECRYPT_S,  # time to decrypt the fixed-size aggregate it was sent
        "ewc_penalty",  # EWC's penalty at the trained weights (after a consolidation)
        "ewc_max_curvature",  # the largest λ·F of the *federated* Fisher the coordinator sent
    }
    allowed_site = {P.SITE_ID, P.STATUS, P.DETAIL, P.SERVER_ROUND, P.MODEL_SHA256, P.EWC_DIGEST}
    train_sizes = {}
    for i in range(exp.simulation.num_sites):
        site = load_toml(SiteConfig, tmp_path / "sites" / f"site-{i}.toml")
        data = load_site_data(exp, site)
        train_sizes[site.site_id] = [len(data.train_set(k)) for k in range(2)]

    def derived(n: int) -> set[float]:
        """What DP-SGD's internals make of N: N, ceil(N/B), 1/ceil(N/B), N·q, E·ceil(N/B)."""
        k = math.ceil(n / exp.train.batch_size)
        return {float(n), float(k), 1.0 / k, n / k, float(exp.train.local_epochs * k)}

    model = RunPlan.of(exp).build_model()
    shapes = {
        "train": [t.shape for t in model.state_dict().values()],
        P.CONSOLIDATE: [p.shape for p in model.parameters() if p.requires_grad],
    }
    kinds = {"train": 0, P.CONSOLIDATE: 0, "evaluate": 0}
    carried = 0  # train replies carrying the evaluation of the model they were sent
    for kind, reply in replies:
        kinds[kind] += 1
        content = reply.content
        site = dict(content.config_records[P.SITE])
        assert site[P.STATUS] == P.STATUS_OK, site
        metrics = dict(content.metric_records.get(P.METRICS, {}))

        def noised_counts_only(evaluation: dict) -> None:
            # Under DP an evaluation sends noised per-task (correct, count), charged first, and
            # ε; no loss and no exact count (tests/test_private_evaluation.py checks the values).
            assert all(k.startswith(("correct-t", "count-t")) or k in allowed_metrics
                       for k in evaluation), evaluation  # fmt: skip
            assert P.NUM_EXAMPLES not in evaluation and P.TRAIN_LOSS not in evaluation

        if kind == "evaluate":
            noised_counts_only(metrics)
            continue
        if P.EVALUATION in content.metric_records:  # the model it was sent, scored (train)
            carried += 1
            noised_counts_only(dict(content.metric_records[P.EVALUATION]))
        assert set(metrics) <= allowed_metrics, set(metrics) - allowed_metrics
        assert P.NUM_EXAMPLES not in metrics and not any(k.startswith("dp_") for k in metrics)
        assert set(site) <= allowed_site, set(site) - allowed_site
        forbidden = set().union(*(derived(n) for n in train_sizes[str(site[P.SITE_ID])]))
        for key, value in metrics.items():
            assert not any(math.isclose(float(value), f, rel_tol=1e-9) for f in forbidden), key
        # The encrypted record's metadata: the key set, the model's layout and the packing
        # (all the experiment's or the model's), never a count: the count is a ciphertext slot.
        for name, record in content.config_records.items():
            if name == P.SITE:
                continue
            assert name == P.meta_key(P.ARRAYS if kind == "train" else P.FISHER), name
            assert set(record) == CKKS_META, set(record) ^ CKKS_META
            assert int(record["ckks-values"]) == sum(
                int(math.prod(shape)) for shape in shapes[kind]
            )  # the model's (or the Fisher's) size, whatever the site's data
            assert float(record["ckks-max-examples"]) == exp.he.max_examples
        for record in content.array_records.values():
            assert all(k.startswith(P.CKKS_BLOCK_PREFIX) for k in record), list(record)
    # One round trip per round: every train reply scored the model it was sent (only those the
    # accuracy matrix reads carry counts), and one evaluate message per site scored the last.
    assert kinds["train"] == 6 and kinds[P.CONSOLIDATE] == 3 and kinds["evaluate"] == 3
    assert carried == 6
    train_metrics = [
        set(dict(r.content.metric_records[P.METRICS])) for k, r in replies if k == "train"
    ]
    assert all({P.DP_EPSILON_RUN, P.DP_BUDGET, "ckks-clipped-fraction"} <= m for m in train_metrics)


# --- through Ray -------------------------------------------------------------------------------
@pytest.mark.slow
def test_sites_that_require_dp_stop_a_ray_run_without_dp(tmp_path) -> None:
    """Virtual sites with a budget (simulation.site_epsilon_budget) refuse a DP-off run."""
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    args = ["train.rounds_per_task=1", "simulation.num_sites=2", "data.num_tasks=2",
            "simulation.site_epsilon_budget=4"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "fedcl.cli.main", "simulate", "digits-domain-il",
         *[a for s in args for a in ("--set", s)], "--out", str(out), "--run-id", "ray-policy"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "stopped" and "every site refused" in results["reason"]
    assert "site policy privacy.require_dp" in results["reason"]
    url = f"sqlite:///{out / 'registry.db'}"
    for site in ("site-0", "site-1"):
        train = _participations(url, "ray-policy", site, "train")
        assert [p.status for p in train] == ["refused"]
        assert train[0].detail.startswith("site policy privacy.require_dp")
        assert PrivacyLedger(out / "sites" / site).entries() == []


# --- fedcl site check ----------------------------------------------------------------------------
def _site(tmp_path: Path, policy: str, budget: str = "") -> Path:
    state = tmp_path / "site"
    args = ["--epsilon-budget", budget] if budget else ["--epsilon-budget", "0"]
    assert main(["site", "init", str(state), "--site-id", "s", "--data", "builtin:0/3", *args]) == 0
    text = (state / "site.toml").read_text()
    (state / "site.toml").write_text(text.replace("\n[privacy]\n", f"\n[privacy]\n{policy}\n"))
    return state


def _check(tmp_path: Path, state: Path, experiment: str, capsys) -> tuple[int, str]:
    exp = tmp_path / "exp.toml"
    exp.write_text('name = "x"\n[data]\ndataset = "digits"\nnum_tasks = 2\n' + experiment)
    capsys.readouterr()
    code = main(["site", "check", str(state), "--experiment", str(exp)])
    err = capsys.readouterr().err.replace("\n", "")
    assert "Traceback" not in err
    return code, err


def test_site_check_reports_what_the_policy_would_refuse(tmp_path, capsys) -> None:
    state = _site(tmp_path, "min_noise_multiplier = 1.0\nmax_epsilon_per_run = 2.0")
    toml = state / "site.toml"
    code, err = _check(tmp_path, state, "", capsys)  # DP off
    assert code == 2 and f"{toml}: field 'privacy.require_dp'" in err and "has DP off" in err
    code, err = _check(tmp_path, state, "[dp]\nnoise_multiplier = 0.5\n", capsys)
    assert code == 2
    assert (
        f"{toml}: field 'privacy.min_noise_multiplier': 1 is above the experiment's "
        "dp.noise_multiplier = 0.5"
    ) in err
    # σ = 0.5 over the run at this site's data spends far more than 2.
    assert f"{toml}: field 'privacy.max_epsilon_per_run': 2 is below the ε = " in err
    assert "that dp.noise_multiplier = 0.5" in err and "over the run at this site's data" in err
    # (batch 32 set, so the DP recipe's batch 128 does not apply: many more, noisier steps)
    code, err = _check(tmp_path, state, "[train]\nbatch_size = 32\n[dp]\nepsilon = 8.0\n", capsys)
    assert code == 2
    assert "field 'privacy.max_epsilon_per_run': 2 is below the experiment's dp.epsilon = 8" in err
    # dp.epsilon = 8 at this site plans a σ below 1.0 (it is planned as the first round would).
    assert f"{toml}: field 'privacy.min_noise_multiplier': 1 is above the σ = 0." in err
    assert "this site plans for the experiment's dp.epsilon = 8 at its data" in err
    code, err = _check(tmp_path, state, "[dp]\nepsilon = 1.0\n", capsys)
    assert code == 0, err  # σ planned for ε = 1 is above 1.0, and 1 ≤ 2


def test_site_check_reports_a_given_sigma_beyond_the_remaining_budget(tmp_path, capsys) -> None:
    state = _site(tmp_path, "", budget="3")
    code, err = _check(tmp_path, state, "[dp]\nnoise_multiplier = 0.5\n", capsys)
    assert code == 2
    assert f"{state / 'site.toml'}: field 'privacy.epsilon_budget': 3, of which 0.00 is " in err
    assert "3.00 remains, less than the ε = " in err and "dp.noise_multiplier = 0.5" in err
    code, err = _check(tmp_path, state, "[dp]\nnoise_multiplier = 5.0\n", capsys)
    assert code == 0, err
    code, err = _check(tmp_path, state, "", capsys)  # the budget alone means "never without DP"
    assert code == 2 and "field 'privacy.require_dp'" in err


def test_site_check_warns_about_a_research_seed(tmp_path, capsys) -> None:
    state = _site(tmp_path, "research_seed = 5")
    exp = tmp_path / "exp.toml"
    exp.write_text('name = "x"\n[data]\ndataset = "digits"\nnum_tasks = 2\n')
    capsys.readouterr()
    assert main(["site", "check", str(state), "--experiment", str(exp)]) == 0
    printed = " ".join("".join(capsys.readouterr()).split())
    assert f"{state / 'site.toml'}: privacy.research_seed is set" in printed
    assert "anyone who learns it can remove this site's noise" in printed
