"""Releases of group size 2 in the privacy ledger (DP-SGD over a keyed bottom-k replay buffer).

One example of a site changes a later task's training set by up to two records under the
add/remove adjacency of Opacus' accountant, so such a release is charged with RDP group privacy
(weak triangle inequality). Checked here: the bound is sound against Rényi divergences
integrated numerically, the ledger line keeps the group size (and old readers cannot miss it),
and group-size-1 histories compose exactly as before.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedcl.privacy.ledger import DPRelease, LedgerError, PrivacyLedger, compose_epsilon
from fedcl.privacy.ledger.compose import group_rdp

DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float, cell: float) -> float:
    """D_α(P‖Q) of log-densities on a grid (log space: the tails underflow otherwise)."""
    terms = alpha * log_p + (1 - alpha) * log_q
    top = terms.max()
    return float((top + np.log(np.exp(terms - top).sum() * cell)) / (alpha - 1))


def _log_normal(grid: np.ndarray, mean: float, sigma: float) -> np.ndarray:
    return -((grid - mean) ** 2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))


def _log_mix(*parts: tuple[float, np.ndarray]) -> np.ndarray:
    out = np.full_like(parts[0][1], -np.inf)
    for weight, log_density in parts:
        if weight > 0:
            out = np.logaddexp(out, math.log(weight) + log_density)
    return out


@pytest.mark.parametrize("sigma, q", [(1.0, 0.1), (0.8, 0.3), (2.0, 0.05), (1.0, 1.0)])
def test_group_2_bound_covers_the_substitution_and_the_two_additions(sigma: float, q: float):
    """One step of DP-SGD (clip 1) on training sets two add/remove steps apart."""
    grid = np.linspace(-40, 40, 160001)
    cell = float(grid[1] - grid[0])
    zero = _log_normal(grid, 0.0, sigma)

    def sampled(shift: float) -> np.ndarray:  # Poisson: the example is in the batch w.p. q
        return _log_mix((1 - q, zero), (q, _log_normal(grid, shift, sigma)))

    both = _log_mix(
        ((1 - q) ** 2, zero),
        (2 * q * (1 - q), _log_normal(grid, 1.0, sigma)),
        (q**2, _log_normal(grid, 2.0, sigma)),
    )
    pairs = {
        "y -> z, opposite gradients": (sampled(1.0), sampled(-1.0)),
        "y -> z, y's gradient zero": (sampled(0.0), sampled(1.0)),
        "two added": (zero, both),
        "two removed": (both, zero),
    }
    orders = np.array([1.5, 2.0, 3.0, 5.0, 8.0])
    bound = group_rdp(sigma, q, 1, 2, orders)
    single = group_rdp(sigma, q, 1, 1, orders)
    for name, (p, r) in pairs.items():
        for alpha, b in zip(orders, bound, strict=True):
            assert _renyi(p, r, alpha, cell) <= b * (1 + 1e-6) + 1e-9, (name, alpha)
    assert np.all(bound > single)
    if q == 1.0:  # no subsampling: the exact curve is that of sensitivity 2, 2α/σ²
        exact = 2 * orders / sigma**2
        assert np.allclose([_renyi(both, zero, a, cell) for a in orders], exact, rtol=1e-4)
        assert np.all(bound >= exact) and np.allclose(
            bound, (2 * orders - 1) ** 2 / (2 * (orders - 1) * sigma**2)
        )


def test_group_size_1_composes_exactly_as_opacus() -> None:
    history = [(1.1, 1 / 93, 186), (1.3, 1 / 50, 100)]
    acc = RDPAccountant()
    acc.history = list(history)
    expected = acc.get_epsilon(DELTA)
    assert compose_epsilon(history, DELTA) == expected
    assert compose_epsilon([(s, q, n, 1) for s, q, n in history], DELTA) == expected
    assert DPRelease("dp-sgd", 0.01, 1.0, 10, DELTA).history == (1.0, 0.01, 10)


def test_group_size_2_costs_more_and_mixes_with_group_1() -> None:
    base = [(1.0, 0.01, 1000)]
    eps1 = compose_epsilon(base, DELTA)
    eps2 = compose_epsilon([(1.0, 0.01, 1000, 2)], DELTA)
    assert 2.0 * eps1 < eps2 < 3.5 * eps1  # about 2.3× here
    mixed = compose_epsilon([(1.0, 0.01, 500), (1.0, 0.01, 500, 2)], DELTA)
    assert eps1 < mixed < eps2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LedgerError, match="group size"):
            compose_epsilon([(1.0, 0.01, 1000, 2)], DELTA, "prv")
    assert compose_epsilon([(0.0, 0.01, 10, 2)], DELTA) == math.inf
    with pytest.raises(LedgerError, match="group_size"):
        DPRelease("dp-sgd", 0.01, 1.0, 10, DELTA, group_size=0)
    with pytest.raises(LedgerError, match="group_size"):
        DPRelease("dp-sgd", 0.01, 1.0, 10, DELTA, group_size=True)


def test_the_ledger_records_the_group_size_and_old_readers_refuse_the_line(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    plain = DPRelease("dp-sgd", 0.01, 1.0, 400, DELTA)
    replay = DPRelease("dp-sgd", 0.01, 1.0, 400, DELTA, group_size=2)
    ledger.record(plain, run_id="r", task_index=0, server_round=1)
    decision = ledger.try_spend(replay, budget=None, run_id="r", task_index=1, server_round=2)
    assert decision.accepted
    assert decision.epsilon_after == pytest.approx(
        compose_epsilon([plain.history, replay.history], DELTA)
    )
    first, second = (json.loads(line) for line in ledger.path.read_text().splitlines())
    assert "group_size" not in first and first["version"] == 1  # unchanged format
    assert second["group_size"] == 2 and second["version"] == 2  # a v1 reader refuses it
    entries = PrivacyLedger(tmp_path).entries()
    assert [e.release for e in entries] == [plain, replay]
    assert ledger.epsilon(DELTA) > compose_epsilon([plain.history, plain.history], DELTA)
    summary = ledger.summary(DELTA)
    assert summary.runs[0].tasks[1].epsilon == pytest.approx(
        compose_epsilon([replay.history], DELTA)
    )
    exceeds, _ = ledger.would_exceed(replay, budget=summary.epsilon_lifetime + 0.1, delta=DELTA)
    assert exceeds


def test_a_group_line_without_its_group_size_is_corrupt(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.record(
        DPRelease("dp-sgd", 0.01, 1.0, 4, DELTA, group_size=2),
        run_id="r",
        task_index=0,
        server_round=1,
    )
    raw = json.loads(ledger.path.read_text())
    del raw["group_size"]
    ledger.path.write_text(json.dumps(raw) + "\n")
    with pytest.raises(LedgerError, match="missing group_size"):
        ledger.entries()
