"""A site's research seed for its secret draws (``privacy.research_seed``; privacy/dp/seeding.py).

Unset, every DP draw comes from the OS and two runs of one DP experiment differ. Set by the
site (a simulation sets it with ``simulation.research_seeds``), DP-SGD's noise and sampling, the
DP Fisher, the noised evaluation counts, the DP drift report and the replay key are drawn from
it, so the run reruns to the bit: the stored models, the released (noised) accuracy matrix and
every site's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from federation_helpers import results_and_models, run_inprocess

from fedcl.config import SiteConfig, load_toml
from fedcl.privacy.dp.seeding import release_seed
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import write_site_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Under DP ε = 8: a DP-SGD release in each train round (and EWC's DP Fisher in its
# consolidation round); the evaluation counts noised (dp.evaluation's default under DP).
DP_RUN = [
    "simulation.num_sites=3",
    "data.num_tasks=2",
    "train.rounds_per_task=1",
    "train.local_epochs=1",
    "train.batch_size=16",
    "dp.epsilon=8",
]


def test_release_seed_names_each_release() -> None:
    assert release_seed(None, 1, "train", "dp-sgd") is None  # the OS's draw
    seed = release_seed(7, 1, "train", "dp-sgd")
    assert seed == release_seed(7, 1, "train", "dp-sgd") and 0 <= seed < 2**63
    others = {
        release_seed(8, 1, "train", "dp-sgd"),
        release_seed(7, 2, "train", "dp-sgd"),
        release_seed(7, 1, "evaluate", "dp-sgd"),
        release_seed(7, 1, "train", "dp-evaluation"),
    }
    assert seed not in others and len(others) == 4


def test_simulation_gives_each_site_its_own_seed_only_when_asked(tmp_path) -> None:
    def seeds(*extra: str) -> list[int | None]:
        exp = load_scenario("digits-domain-il", [*DP_RUN, *extra])[1]
        out = tmp_path / str(len(extra))
        paths = write_site_configs(exp, out)
        return [load_toml(SiteConfig, p).privacy.research_seed for p in paths]

    assert seeds() == [None, None, None]
    seeded = seeds("simulation.research_seeds=true")
    assert None not in seeded and len(set(seeded)) == 3


def _run(tmp_path: Path, *extra: str) -> tuple[dict, list[bytes], list[list[tuple]]]:
    exp = load_scenario("digits-domain-il", [*DP_RUN, *extra])[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    results, blobs = results_and_models(opts, tmp_path)
    ledgers = [
        [(e.server_round, e.mechanism, e.noise_multiplier) for e in PrivacyLedger(site).entries()]
        for site in sorted((tmp_path / "sites").glob("site-*/"))
    ]
    return results, blobs, ledgers


@pytest.mark.parametrize(
    ("method", "releases", "kinds"),
    [
        ("ewc", {"dp-sgd", "fisher", "dp-evaluation"}, ["train", "consolidate", "train"]),
        # replay: the buffer's membership is keyed by the site's secret, derived from the seed
        ("replay", {"dp-sgd", "dp-evaluation"}, ["train", "train"]),
    ],
)
def test_seeded_dp_run_reruns_bit_identically(tmp_path, method, releases, kinds) -> None:
    seeded = ["simulation.research_seeds=true", f'continual.method="{method}"']
    a, models_a, ledgers_a = _run(tmp_path / "a", *seeded)
    b, models_b, ledgers_b = _run(tmp_path / "b", *seeded)
    assert {m for ledger in ledgers_a for _r, m, _s in ledger} == releases
    assert [r["kind"] for r in a["rounds"]] == kinds
    assert len(models_a) == len(kinds) and models_a == models_b  # every model, byte for byte
    assert a["accuracy_matrix"] == b["accuracy_matrix"]  # the noised counts, to the bit
    assert ledgers_a == ledgers_b
    # The OS's draws (the default): the same experiment trains another model.
    _, models_c, _ = _run(tmp_path / "c", f'continual.method="{method}"')
    assert models_c[0] != models_a[0]


def test_seeded_drift_reports_repeat(tmp_path) -> None:
    """The DP drift report (a Gaussian release of its own) draws from the site's seed too, and
    so do its keyed window and reference: a second run (another run id, as every `fedcl
    simulate` gets) reports the same scores."""
    from fedcl.client.app import app
    from fedcl.config import protocol as P

    def drift_metrics(out: Path, *extra: str, run_id: str = "test-run") -> list[dict]:
        exp = load_scenario(
            "digits-drift",
            [
                "train.rounds_per_task=1",
                "drift.trigger.watch_rounds=2",
                "dp.noise_multiplier=1.0",
                "dp.evaluation='withheld'",
                "drift.action='alert'",
                "simulation.num_sites=2",
                *extra,
            ],
        )[1]
        replies: list[dict] = []

        def spy(node_id, msg, context):
            reply = app(msg, context)
            if msg.metadata.message_type == P.DRIFT:
                replies.append(dict(reply.content.metric_records[P.METRICS]))
            return reply

        status, _opts, _ = run_inprocess(exp, out, intercept=spy, run_id=run_id)
        assert status == "completed"
        return sorted(replies, key=repr)

    a = drift_metrics(tmp_path / "a", "simulation.research_seeds=true")
    b = drift_metrics(tmp_path / "b", "simulation.research_seeds=true", run_id="another-run")
    assert a and all(m for m in a) and a == b  # the noised scores, to the bit
    assert drift_metrics(tmp_path / "c") != a  # the OS's noise
