"""The site privacy ledger: exact Opacus composition over restarts and runs, budgets, corruption.

The reference for every ε here is Opacus' own ``RDPAccountant`` stepped one step at a time, as
the engine would during training: the ledger must report the same number without ever summing
per-round ε values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from opacus.accountants import RDPAccountant
from typer import Typer
from typer.testing import CliRunner

from fedcl.cli.privacy_cmd import privacy
from fedcl.privacy import DPRelease, LedgerError, PrivacyLedger, compose_epsilon

DELTA = 1e-5


def _hand_epsilon(releases: list[DPRelease], delta: float = DELTA) -> float:
    """ε as Opacus' engine would report it after taking every step of ``releases``."""
    acc = RDPAccountant()
    for release in releases:
        for _ in range(release.steps):
            acc.step(noise_multiplier=release.noise_multiplier, sample_rate=release.sample_rate)
    return acc.get_epsilon(delta)


def _release(q: float = 1 / 93, sigma: float = 1.1, steps: int = 186) -> DPRelease:
    return DPRelease("dp-sgd", q, sigma, steps, DELTA)


RUN_A = [_release(), _release(1 / 50, 1.3, 100), _release()]
RUN_B = [_release(1 / 20, 0.9, 40), DPRelease("fisher", 1.0, 25.0, 1, DELTA), _release()]


def test_composition_matches_opacus_across_restart_subprocess_and_second_run(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger(tmp_path)
    assert ledger.entries() == [] and ledger.epsilon(DELTA) == 0.0
    for i, release in enumerate(RUN_A):
        ledger.record(release, run_id="run-a", task_index=i // 2, server_round=i + 1)
    assert ledger.epsilon(DELTA) == pytest.approx(_hand_epsilon(RUN_A), abs=1e-6)

    # A "process restart": a separate Python process appends run B's first two releases.
    script = (
        "import sys; from fedcl.privacy.ledger import DPRelease, PrivacyLedger\n"
        "ledger = PrivacyLedger(sys.argv[1])\n"
        f"ledger.record(DPRelease('dp-sgd', 1 / 20, 0.9, 40, {DELTA}), run_id='run-b',"
        " task_index=0, server_round=1)\n"
        f"ledger.record(DPRelease('fisher', 1.0, 25.0, 1, {DELTA}), run_id='run-b',"
        " task_index=0, server_round=2)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    reopened = PrivacyLedger(tmp_path)
    reopened.record(RUN_B[2], run_id="run-b", task_index=1, server_round=3)

    assert [e.run_id for e in PrivacyLedger(tmp_path).entries()] == ["run-a"] * 3 + ["run-b"] * 3
    lifetime = PrivacyLedger(tmp_path).epsilon(DELTA)
    run_a = PrivacyLedger(tmp_path).epsilon(DELTA, run_id="run-a")
    run_b = PrivacyLedger(tmp_path).epsilon(DELTA, run_id="run-b")
    assert lifetime == pytest.approx(_hand_epsilon(RUN_A + RUN_B), abs=1e-6)
    assert run_a == pytest.approx(_hand_epsilon(RUN_A), abs=1e-6)
    assert run_b == pytest.approx(_hand_epsilon(RUN_B), abs=1e-6)
    # Composition is sub-additive: the lifetime exceeds each run but not their sum.
    assert max(run_a, run_b) < lifetime < run_a + run_b
    # The accountant's history format is what the ledger hands to Opacus.
    assert reopened.history(run_id="run-a")[0] == (1.1, 1 / 93, 186)


def test_the_ledgers_orders_are_opacus_default_alphas() -> None:
    from opacus.accountants import RDPAccountant

    from fedcl.privacy.ledger.rdp_analysis import RDP_ORDERS

    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


def test_summary_per_run_and_task(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for i, release in enumerate(RUN_A):
        ledger.record(release, run_id="run-a", task_index=i // 2, server_round=i + 1)
    for i, release in enumerate(RUN_B):
        ledger.record(release, run_id="run-b", task_index=0, server_round=i + 1)
    summary = ledger.summary(DELTA, budget=100.0)
    assert [r.run_id for r in summary.runs] == ["run-a", "run-b"]
    run_a = summary.runs[0]
    assert (run_a.releases, run_a.steps) == (3, 186 + 100 + 186)
    assert [(t.task_index, t.releases) for t in run_a.tasks] == [(0, 2), (1, 1)]
    assert run_a.tasks[0].epsilon == pytest.approx(_hand_epsilon(RUN_A[:2]), abs=1e-6)
    assert run_a.epsilon == pytest.approx(_hand_epsilon(RUN_A), abs=1e-6)
    assert summary.epsilon_lifetime == pytest.approx(_hand_epsilon(RUN_A + RUN_B), abs=1e-6)
    assert summary.remaining == pytest.approx(100.0 - summary.epsilon_lifetime)
    assert json.loads(json.dumps(summary.to_dict()))["runs"][1]["releases"] == 3


def test_prv_accountant_is_tighter_and_noiseless_release_is_infinite(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for i, release in enumerate(RUN_A):
        ledger.record(release, run_id="run-a", task_index=0, server_round=i)
    rdp, prv = ledger.epsilon(DELTA), ledger.epsilon(DELTA, accountant="prv")
    assert 0.5 * rdp < prv <= rdp
    with pytest.raises(LedgerError, match="unknown accountant"):
        ledger.epsilon(DELTA, accountant="sum-of-epsilons")
    ledger.record(_release(sigma=0.0), run_id="run-b", task_index=0, server_round=1)
    assert math.isinf(ledger.epsilon(DELTA))
    assert ledger.summary(DELTA).to_dict()["epsilon_lifetime"] == "inf"


def test_budget_pays_for_k_rounds_then_refuses(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    budget, round_release = 2.0, _release(q=0.02, sigma=1.0, steps=50)
    paid = 0
    for server_round in range(1, 50):
        exceeds, after = ledger.would_exceed(round_release, budget, DELTA)
        if exceeds:
            assert after > budget
            break
        ledger.record(round_release, run_id="r", task_index=0, server_round=server_round)
        paid += 1
        assert ledger.epsilon(DELTA) == pytest.approx(after, abs=1e-9) and after <= budget
    assert paid >= 2, "a 2.0 budget pays for a few rounds at sigma = 1"
    assert ledger.would_exceed(round_release, budget, DELTA)[0]  # still refused next time
    assert ledger.epsilon(DELTA) <= budget
    assert ledger.epsilon(DELTA) == pytest.approx(_hand_epsilon([round_release] * paid), abs=1e-6)
    # A new run at the same site starts from the site's lifetime spend, not from zero.
    decision = ledger.try_spend(
        round_release, budget=budget, run_id="r2", task_index=0, server_round=1
    )
    assert not decision.accepted and decision.epsilon_before <= budget < decision.epsilon_after
    assert len(ledger.entries()) == paid


def test_try_spend_is_race_free_across_writers(tmp_path: Path) -> None:
    """Eight concurrent writers (separate lock handles, as separate processes would have)."""
    budget, release = 2.0, _release(q=0.02, sigma=1.0, steps=50)
    results: list[bool] = []

    def worker(i: int) -> None:
        for r in range(3):
            decision = PrivacyLedger(tmp_path).try_spend(
                release, budget=budget, run_id=f"w{i}", task_index=0, server_round=r
            )
            results.append(decision.accepted)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger = PrivacyLedger(tmp_path)
    assert sum(results) == len(ledger.entries()) >= 1
    assert ledger.epsilon(DELTA) <= budget
    assert ledger.would_exceed(release, budget, DELTA)[0]  # filled up to the budget


def test_corrupt_line_names_file_and_line(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.record(_release(), run_id="a", task_index=0, server_round=1)
    ledger.record(_release(), run_id="a", task_index=0, server_round=2)
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n")
    with pytest.raises(LedgerError) as err:
        PrivacyLedger(tmp_path).epsilon(DELTA)
    assert str(ledger.path) in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(LedgerError, match="line 2"):  # never append behind a corrupt line
        ledger.record(_release(), run_id="a", task_index=0, server_round=3)

    bad = json.loads(lines[0]) | {"steps": -3}
    ledger.path.write_text(lines[0] + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(LedgerError, match=r"line 3: steps must be an int >= 0"):
        ledger.entries()


def test_crash_mid_write_leaves_a_readable_ledger(tmp_path: Path) -> None:
    """A write goes to a temp file renamed over the ledger: a crash leaves a stray temp file."""
    ledger = PrivacyLedger(tmp_path)
    ledger.record(_release(), run_id="a", task_index=0, server_round=1)
    (tmp_path / "privacy_ledger.jsonl.crash.tmp").write_text('{"run_id": "a", "task_ind')
    assert len(PrivacyLedger(tmp_path).entries()) == 1
    ledger.record(_release(), run_id="a", task_index=0, server_round=2)
    assert ledger.epsilon(DELTA) == pytest.approx(_hand_epsilon([_release()] * 2), abs=1e-6)
    assert ledger.path.read_bytes().endswith(b"\n")


def test_invalid_releases_are_refused() -> None:
    with pytest.raises(LedgerError, match="sample_rate must be in"):
        DPRelease("dp-sgd", 0.0, 1.0, 10, DELTA)
    with pytest.raises(LedgerError, match="noise_multiplier"):
        DPRelease("dp-sgd", 0.1, -1.0, 10, DELTA)
    with pytest.raises(LedgerError, match="delta"):
        compose_epsilon([(1.0, 0.1, 10)], 0.0)
    # Another feature's record (continual.fisher.FisherRelease has these four fields).
    fisher = SimpleNamespace(mechanism="fisher", sample_rate=1.0, noise_multiplier=20.0, steps=1)
    assert DPRelease.of(fisher, DELTA) == DPRelease("fisher", 1.0, 20.0, 1, DELTA)


def test_cli_table_and_json(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for i, release in enumerate(RUN_A):
        ledger.record(release, run_id="run-a", task_index=i // 2, server_round=i + 1)
    app = Typer()
    app.command("privacy")(privacy)
    app.command("other")(lambda: None)  # two commands: "privacy" stays a sub-command name
    runner = CliRunner()
    table = runner.invoke(app, ["privacy", "--state", str(tmp_path), "--budget", "10"])
    assert table.exit_code == 0, table.output
    assert "run-a" in table.output and "lifetime" in table.output and "remaining" in table.output
    as_json = runner.invoke(app, ["privacy", "--state", str(tmp_path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["epsilon_lifetime"] == pytest.approx(_hand_epsilon(RUN_A), abs=1e-6)
    assert data["runs"][0]["tasks"][1]["releases"] == 1
    missing = runner.invoke(app, ["privacy", "--state", str(tmp_path / "nope")])
    assert isinstance(missing.exception, LedgerError) and "nope" in str(missing.exception)
