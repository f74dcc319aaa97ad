"""Evaluation under DP (issue 12): what leaves a site is noised and charged first, or nothing.

The replies are read as the coordinator receives them (a spy around the real ClientApp), and
each site's ledger is read at the moment its reply leaves: a noised evaluation is in the ledger
by then, and no reply under DP carries an exact count or a loss.
"""

from __future__ import annotations

import math

from federation_helpers import run_inprocess, small_experiment

from fedcl.client.app import app
from fedcl.client.site import load_site_data
from fedcl.config import SiteConfig, load_toml
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.dp import COUNT_SENSITIVITY, MECHANISM_EVALUATION
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.runner import write_site_configs

DP_KEYS = {P.DP_EPSILON_RUN, P.DP_EPSILON_LIFETIME, P.DP_DELTA}


def _spy(tmp_path, seen: list[dict]):
    """Every reply as it leaves its site, and the evaluations it carries as ``evaluate``.

    With ``evaluation.mode = "with_train"`` (the default) a train message also evaluates the
    model it carries, the output of round ``evaluate-round``: recorded as an evaluation of
    that round, charged (under noised DP) in the train message's round.
    """

    def spy(node_id, msg, context):
        reply = app(msg, context)
        site = dict(reply.content.config_records[P.SITE])
        cfg = msg.content[P.CONFIG]
        server_round = int(cfg[P.SERVER_ROUND])
        ledger = PrivacyLedger(tmp_path / "sites" / str(site[P.SITE_ID]))
        charged = [  # what the site's ledger holds as the reply leaves
            e
            for e in ledger.entries()
            if e.mechanism == MECHANISM_EVALUATION and e.server_round == server_round
        ]
        kind = msg.metadata.message_type
        if kind == "train" and P.EVALUATE_ROUND in cfg:
            seen.append(
                {
                    "kind": "evaluate",
                    "round": int(cfg[P.EVALUATE_ROUND]),
                    "site": str(site[P.SITE_ID]),
                    "status": site.get(P.EVALUATION_STATUS, site[P.STATUS]),
                    "metrics": dict(reply.content.metric_records.get(P.EVALUATION, {})),
                    "charged": charged,
                }
            )
        seen.append(
            {
                "kind": kind,
                "round": server_round,
                "site": str(site[P.SITE_ID]),
                "status": site[P.STATUS],
                "metrics": dict(reply.content.metric_records.get(P.METRICS, {})),
                "charged": charged,
            }
        )
        return reply

    return spy


def _test_sizes(exp, tmp_path, site: str) -> list[int]:
    data = load_site_data(exp, load_toml(SiteConfig, tmp_path / "sites" / f"{site}.toml"))
    return [len(data.test_set(j)) for j in range(len(data.stream.evaluation_tasks))]


def test_noised_evaluation_is_charged_before_it_leaves_and_withheld_off_the_matrix(
    tmp_path,
) -> None:
    exp = small_experiment(
        "digits-domain-il",
        "data.num_tasks=2",
        "train.rounds_per_task=2",
        "simulation.num_sites=2",
        "dp.epsilon=8",
    )
    assert exp.dp.evaluation == "noised"  # the default under DP
    seen: list[dict] = []
    status, opts, _ = run_inprocess(exp, tmp_path, intercept=_spy(tmp_path, seen))
    assert status == "completed"
    sigma = RunPlan.of(exp).evaluation_noise_multiplier  # what the coordinator sent
    assert 1.0 < sigma < 3.0  # naive fine-tuning: the test data is its own cell
    evaluations = [r for r in seen if r["kind"] == "evaluate"]
    assert {r["round"] for r in evaluations} == {0, 1, 2, 3, 4}
    errors = []
    for r in evaluations:
        assert r["status"] == P.STATUS_OK
        if r["round"] in (1, 3):  # not read by the accuracy matrix: nothing leaves, nothing paid
            assert r["metrics"] == {} and r["charged"] == []
            continue
        # The baseline and each task's last round: noised counts, paid for before they left.
        assert len(r["charged"]) == 1, r
        release = r["charged"][0].release
        assert (release.noise_multiplier, release.sample_rate, release.steps) == (sigma, 1.0, 1)
        counts = {k for k in r["metrics"] if k.startswith(("correct-t", "count-t"))}
        assert counts == {"correct-t0", "correct-t1", "count-t0", "count-t1"}
        assert set(r["metrics"]) - counts <= DP_KEYS | {P.DP_BUDGET}, r["metrics"]  # ε only
        exact = _test_sizes(exp, tmp_path, r["site"])
        for j, n in enumerate(exact):
            released = r["metrics"][f"count-t{j}"]
            assert released != n and not float(released).is_integer()
            errors.append(released - n)
    # The noise is what the release states: sd σ·√2 on each count (chi-square over 12 draws).
    sd = sigma * COUNT_SENSITIVITY
    ratio = sum(e * e for e in errors) / len(errors) / sd**2
    assert len(errors) == 12 and 0.05 < ratio < 4.5, ratio  # p < 1e-5 either side
    trains = [r for r in seen if r["kind"] == "train"]
    assert trains and all(P.TRAIN_LOSS not in r["metrics"] for r in trains)  # kept at the site
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    for site, s in results["sites"].items():
        ledger = PrivacyLedger(tmp_path / "sites" / site)
        assert sum(e.mechanism == MECHANISM_EVALUATION for e in ledger.entries()) == 3
        # The registry's ε includes the last evaluation; the plan met dp.epsilon with it.
        assert s["epsilon"] == ledger.epsilon(1e-5, run_id=opts.run_id) <= 8.0 + 1e-6
    evaluation = results["evaluation"]
    assert evaluation["mode"] == "noised" and evaluation["count_noise_sd"] == sd
    shape = [len(row) for row in results["accuracy_matrix"]]
    assert [len(row) for row in evaluation["accuracy_noise_sd"]] == shape == [2, 2]
    cells = [v for row in evaluation["accuracy_noise_sd"] for v in row if v is not None]
    assert cells and all(v > 0 for v in cells)
    accs = [v for row in results["accuracy_matrix"] for v in row if v is not None]
    assert all(0.0 <= v <= 1.0 for v in accs)


def test_withheld_sends_nothing_and_clear_is_refused_by_a_site_that_requires_dp(
    tmp_path,
) -> None:
    base = ("data.num_tasks=1", "simulation.num_sites=2", "dp.noise_multiplier=1.0")
    withheld = small_experiment("digits-domain-il", *base, 'dp.evaluation="withheld"')
    seen: list[dict] = []
    status, opts, _ = run_inprocess(withheld, tmp_path / "w", intercept=_spy(tmp_path / "w", seen))
    assert status == "completed"
    evaluations = [r for r in seen if r["kind"] == "evaluate"]
    assert evaluations and all(r["metrics"] == {} and not r["charged"] for r in evaluations)
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
    assert results["evaluation"] == {"mode": "withheld"}
    assert all(v is None for row in results["accuracy_matrix"] for v in row)

    clear = small_experiment("digits-domain-il", *base, 'dp.evaluation="clear"')
    sites = tmp_path / "c" / "sites"
    write_site_configs(clear, sites)
    text = (sites / "site-0.toml").read_text()
    (sites / "site-0.toml").write_text(text.replace("[privacy]", "[privacy]\nrequire_dp = true"))
    seen = []
    status, opts, _ = run_inprocess(clear, tmp_path / "c", intercept=_spy(tmp_path / "c", seen))
    assert status == "completed"
    for r in (r for r in seen if r["kind"] == "evaluate"):
        if r["site"] == "site-0":  # its policy: no exact counts and losses under DP
            assert r["status"] == P.STATUS_REFUSED
            assert not any(k.startswith(("correct-t", "count-t", "loss-t")) for k in r["metrics"])
            continue
        exact = _test_sizes(clear, tmp_path / "c", r["site"])
        assert [r["metrics"][f"count-t{j}"] for j in range(len(exact))] == exact  # exact counts
        assert all(math.isfinite(r["metrics"][f"loss-t{j}"]) for j in range(len(exact)))
