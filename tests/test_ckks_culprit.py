"""The culprit search as pure group testing: an exact oracle, every culprit set, every size.

``oracle(group)`` passes iff the group holds no culprit (what a checked group sum answers, up
to a ~2^-75 chance of two damaged updates cancelling). Every oracle here also asserts that it
is never asked about fewer than ``min_group_size`` sites.
"""

from __future__ import annotations

import itertools
import math

import pytest

from fedcl.privacy.ckks.culprit import CulpritSearch, find_culprits, verifier_for
from fedcl.privacy.ckks.errors import GroupTooSmall


def sites_of(k: int) -> list[str]:
    return [f"s{i:02d}" for i in range(k)]


def search(sites, culprits, m: int, **kwargs) -> CulpritSearch:
    bad = set(culprits)

    def oracle(group: tuple[str, ...]) -> bool:
        assert len(group) >= m and len(set(group)) == len(group)
        assert list(group) == sorted(group, key=sites.index)  # in the sites' order
        return not bad & set(group)

    return find_culprits(sites, oracle, min_group_size=m, **kwargs)


def test_one_culprit_among_five_with_groups_of_two() -> None:
    sites = sites_of(5)
    for culprit in sites:
        r = search(sites, {culprit}, 2)
        assert r.culprits == (culprit,) and r.undetermined == () and r.excluded == (culprit,)
        assert r.honest == tuple(s for s in sites if s != culprit) and r.can_sum_honest
        assert 2 <= r.oracle_calls <= 4 and min(len(c.group) for c in r.checks) >= 2


@pytest.mark.parametrize("m", [2, 3, 4])
def test_one_culprit_is_always_found_within_the_stated_number_of_calls(m: int) -> None:
    extra = 2 if m == 2 else m
    for k in range(m + 1, 33):
        sites = sites_of(k)
        for culprit in sites:
            r = search(sites, {culprit}, m)
            assert r.culprits == (culprit,) and r.undetermined == (), (k, culprit, r.checks)
            assert r.oracle_calls <= math.ceil(math.log2(k)) + extra, (k, culprit, r.checks)


@pytest.mark.parametrize("m", [2, 3])
def test_every_answer_is_proven_whatever_the_culprits(m: int) -> None:
    """Soundness over every culprit set of up to 7 sites: no honest site excluded as a culprit,
    no culprit kept; every site accounted for once."""
    for k in range(2, 8):
        sites = sites_of(k)
        for r_ in range(0, k + 1):
            for bad in itertools.combinations(sites, r_):
                r = search(sites, bad, m, known_failing=bool(bad))
                assert set(r.culprits) <= set(bad) and not set(r.honest) & set(bad)
                assert sorted(r.culprits + r.honest + r.undetermined) == sites
                if not bad:
                    assert r.honest == tuple(sites) or (k < m and r.undetermined == tuple(sites))


def test_several_culprits_are_found_when_enough_sites_are_honest() -> None:
    sites = sites_of(12)
    r = search(sites, {"s01", "s07", "s08"}, 2)
    assert r.culprits == ("s01", "s07", "s08") and r.undetermined == ()
    r = search(sites_of(4), {"s00", "s02"}, 2)  # every first split fails: needs the bootstrap
    assert r.culprits == ("s00", "s02") and r.honest == ("s01", "s03")


def test_what_cannot_be_told_apart_is_undetermined() -> None:
    r = search(sites_of(2), {"s00"}, 2)  # the only group of two is the failing aggregate
    assert r.undetermined == ("s00", "s01") and r.oracle_calls == 0 and not r.can_sum_honest
    r = search(sites_of(3), {"s00", "s01"}, 2)  # every group of two holds a culprit
    assert r.culprits == () and r.honest == () and len(r.undetermined) == 3


def test_an_aggregate_not_known_to_fail_is_asked_first() -> None:
    sites = sites_of(6)
    r = search(sites, set(), 2, known_failing=False)
    assert r.honest == tuple(sites) and r.oracle_calls == 1
    assert r.checks[0].group == tuple(sites) and r.checks[0].passed
    r = search(sites, {"s04"}, 2, known_failing=False)
    assert r.culprits == ("s04",) and not r.checks[0].passed


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(GroupTooSmall, match="at least 2"):
        find_culprits(sites_of(4), lambda g: True, min_group_size=1)
    with pytest.raises(ValueError, match="distinct"):
        find_culprits(["a", "b", "a"], lambda g: True)


def test_the_verifier_is_outside_the_group_and_takes_turns() -> None:
    sites = sites_of(5)
    group = ("s01", "s02")
    picked = [verifier_for(group, sites, turn=t) for t in range(4)]
    assert picked == ["s00", "s03", "s04", "s00"]
    assert verifier_for(group, sites, exclude=["s00"]) == "s03"
    assert verifier_for(sites, sites) is None


def test_the_experiment_sets_the_minimum_group_size() -> None:
    from pydantic import ValidationError

    from fedcl.config.experiment import HESpec

    assert HESpec().min_group_size == 2 and HESpec(min_group_size=3).min_group_size == 3
    with pytest.raises(ValidationError, match="min_group_size"):
        HESpec(min_group_size=1)
