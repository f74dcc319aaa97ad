"""A site's research seed for its DP draws (``privacy.noise_seed``; privacy/dp/seeding.py).

Unset, every DP draw comes from the OS and two runs of one DP experiment differ. Set by the
site (a simulation sets it with ``simulation.seed_dp_noise``), DP-SGD's noise and sampling, the
DP Fisher and the noised evaluation counts are drawn from it, so the run reruns to the bit: the
stored models, the released (noised) accuracy matrix and every site's ledger.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from federation_helpers import run_inprocess

from fedcl.config import SiteConfig, load_toml
from fedcl.privacy.dp.seeding import release_seed
from fedcl.privacy.ledger import PrivacyLedger
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import write_site_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# EWC: a DP-SGD release in each train round and a DP Fisher in the consolidation round; the
# evaluation counts noised (dp.evaluation's default under DP).
DP_RUN = [
    "simulation.num_sites=3",
    "data.num_tasks=2",
    "train.rounds_per_task=1",
    "train.local_epochs=1",
    "train.batch_size=16",
    'continual.method="ewc"',
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
        return [load_toml(SiteConfig, p).privacy.noise_seed for p in paths]

    assert seeds() == [None, None, None]
    seeded = seeds("simulation.seed_dp_noise=true")
    assert None not in seeded and len(set(seeded)) == 3


def _run(tmp_path: Path, *extra: str) -> tuple[dict, list[bytes], list[list[tuple]]]:
    exp = load_scenario("digits-domain-il", [*DP_RUN, *extra])[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, opts.run_id)
        versions = sorted(reg.list_model_versions(opts.run_id), key=lambda v: v.server_round)
    blobs = []
    for v in versions:
        path = Path(v.path)
        blobs.append((path if path.is_absolute() else tmp_path / "artifacts" / path).read_bytes())
    ledgers = [
        [(e.server_round, e.mechanism, e.noise_multiplier) for e in PrivacyLedger(site).entries()]
        for site in sorted((tmp_path / "sites").glob("site-*/"))
    ]
    return results, blobs, ledgers


def test_seeded_dp_run_reruns_bit_identically(tmp_path) -> None:
    a, models_a, ledgers_a = _run(tmp_path / "a", "simulation.seed_dp_noise=true")
    b, models_b, ledgers_b = _run(tmp_path / "b", "simulation.seed_dp_noise=true")
    mechanisms = {m for ledger in ledgers_a for _r, m, _s in ledger}
    assert mechanisms == {"dp-sgd", "fisher", "dp-evaluation"}, mechanisms
    assert [r["kind"] for r in a["rounds"]] == ["train", "consolidate", "train"]
    assert len(models_a) == 3 and models_a == models_b  # every stored model, byte for byte
    assert a["accuracy_matrix"] == b["accuracy_matrix"]  # the noised counts, to the bit
    assert ledgers_a == ledgers_b
    # The OS's draws (the default): the same experiment trains another model.
    _, models_c, _ = _run(tmp_path / "c")
    assert models_c[0] != models_a[0]
