"""A simulation's CKKS weight unit: its largest virtual site (runner.fit_weight_unit).

A site's encrypted weight is n / he.max_examples at a fixed quantisation step, so the error of
the average grows with the unit; a simulation can count its sites, so it fits the unit to them
unless the experiment sets one.
"""

from __future__ import annotations

import pytest

from fedcl.client.site import load_site_data
from fedcl.config import SiteConfig, load_toml
from fedcl.privacy.ckks import packing_for
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.runner import fit_weight_unit, write_site_configs


def _fitted(tmp_path, *overrides: str):
    exp = load_scenario("digits-domain-il", list(overrides))[1]
    paths = write_site_configs(exp, tmp_path / "sites")
    sizes = [len(load_site_data(exp, load_toml(SiteConfig, p)).train.y) for p in paths]
    return exp, fit_weight_unit(exp, paths), sizes


def test_unit_is_the_largest_site_and_shrinks_the_error_bound(tmp_path) -> None:
    exp, fitted, sizes = _fitted(tmp_path, "he.enabled=true")
    assert exp.he.max_examples == 10_000
    assert fitted.he.max_examples == max(sizes) < 10_000  # 513 at seed 0: 5 sites of 177-513
    # No site is capped (each trains on at most its training set), and the bound on the error
    # of the encrypted average (contributors · step · unit / Σn) shrinks by the same factor.
    before, after = packing_for(exp.he), packing_for(fitted.he)
    ratio = after.error_bound(5, sum(sizes)) / before.error_bound(5, sum(sizes))
    assert ratio == pytest.approx(max(sizes) / 10_000)
    assert fitted.model_copy(update={"he": exp.he}) == exp  # nothing else changed


def test_a_unit_the_experiment_sets_is_kept_and_plaintext_runs_are_untouched(tmp_path) -> None:
    exp, fitted, _ = _fitted(tmp_path / "set", "he.enabled=true", "he.max_examples=10000")
    assert fitted.he.max_examples == 10_000
    exp, fitted, _ = _fitted(tmp_path / "off")
    assert fitted is exp
