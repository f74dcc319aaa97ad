"""Which site corrupted an aggregate: adaptive group testing over sums of >= m sites (issue 11).

When the sites report that an aggregate is corrupt (:class:`~.errors.AggregateIntegrityError`),
the coordinator still holds every site's validated reply. It can add any *group* of them and
ask a site whether that group's sum verifies (decrypts to integers whose checksum matches,
:mod:`.integrity`). A group with no damaged update verifies; a group with one does not (unless
two damaged updates cancel exactly, probability about 2^-75). :func:`find_culprits` asks such
questions, never about fewer than ``min_group_size`` sites (``he.min_group_size``, at least 2),
until every site is proven honest (in a group that verified) or a culprit (the one unproven
member of a set known to hold a culprit), and returns both: the honest sites' sum is the
round's aggregate without the culprits.

The search is pure: its input is the list of sites and an oracle ``group -> passed``. The
ciphertext side (forming a group's sum at the coordinator, checking it at a site) is
:mod:`.groups`; the Flower round trip that carries the question is the coordinator's.

How it searches
---------------
The set of all sites failed (the aggregate). A set known to hold a culprit is split: the first
half is tested, padded with sites already proven honest when it has fewer than m members. If it
verifies, its members are honest and the culprit is in the rest; if not, the culprit is in it,
and the rest is kept for later. A single site left in a failing set is a culprit. Sites kept
for later are tested together once the culprit is found ("then excluding"): if they verify the
search ends, else the search goes on among them (a second culprit). With too few honest sites
to pad a half (at the start, when m is about half the set or more), the kept sites are tested
first to supply them; failing that, each member x of the set is tested as "the set without x"
filled up with kept sites: the one whose test verifies is the culprit. Only with several
culprits can every test fail before any site is proven honest; then up to 2·K groups of m
unproven sites are tried to find m honest ones.

Every answer is proven from the oracle's bits (a site is honest only if a group holding it
verified, a culprit only if it is the last unproven member of a set known to hold one), so
with an exact oracle no honest site is ever excluded as a culprit and no culprit is kept.
Oracle calls for one culprit among K sites (found whenever K - 1 >= m): at most
ceil(log2 K) + 2 for m = 2 (K = 5: 3 or 4) and ceil(log2 K) + m in general, checked for every
position of the culprit in ``tests/test_ckks_culprit.py``. Several culprits cost more; sites
that cannot be proven either way with groups of >= m sites (K = 2; more culprits than honest
sites to pad with) come back ``undetermined``, to be excluded with the culprits.

What it defends against, and what not
-------------------------------------
* It is built for **faulty** sites (a flipped bit, a broken disk, a buggy build), not malicious
  ones: a malicious site holds the shared secret key and can encrypt garbage with a consistent
  checksum, which no search here can see.
* An **honest-but-curious coordinator** learns one bit per oracle call: whether the sum of a
  group of >= m sites verified. It never receives a plaintext, and never asks about fewer than
  m sites (:class:`~.errors.GroupTooSmall` guards both ends: the search and the site asked).
  The bits name the faulty site; that is the purpose.
* The **verifying site** sees the plaintext of each group sum it checks, as every site sees
  the aggregate. The search's own groups overlap (padding reuses proven-honest sites), so one
  site checking {u1, u3} and {u1, u4} could subtract them (u3 - u4). Route each check to a
  site outside the group, and to different sites in turn (:func:`verifier_for`).
* A **malicious coordinator** chooses the groups: it could ask about overlapping groups of
  exactly m sites (u1 + u2, then u2 + u3) of the same site; only ``min_group_size`` bounds what
  one decryption shows. It also reports the outcome, so it can exclude any site it likes,
  search or no search.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import GroupTooSmall

#: ``oracle(group) -> passed``: whether the sum of the group's updates verifies at a site.
Oracle = Callable[[tuple[str, ...]], bool]


@dataclass(frozen=True)
class GroupCheck:
    """One oracle call: the group (in the sites' order) and whether its sum verified."""

    group: tuple[str, ...]
    passed: bool


@dataclass(frozen=True)
class CulpritSearch:
    """What :func:`find_culprits` proved, and every oracle call it made to prove it."""

    sites: tuple[str, ...]
    min_group_size: int
    culprits: tuple[str, ...]
    honest: tuple[str, ...]
    undetermined: tuple[str, ...]
    checks: tuple[GroupCheck, ...]

    @property
    def excluded(self) -> tuple[str, ...]:
        """Sites to leave out of the round's sum: the culprits and the undetermined."""
        out = set(self.culprits) | set(self.undetermined)
        return tuple(s for s in self.sites if s in out)

    @property
    def oracle_calls(self) -> int:
        return len(self.checks)

    @property
    def can_sum_honest(self) -> bool:
        """Whether the honest sites are enough for a sum (>= min_group_size of them)."""
        return len(self.honest) >= self.min_group_size


def find_culprits(
    sites: Sequence[str],
    oracle: Oracle,
    *,
    min_group_size: int = 2,
    known_failing: bool = True,
) -> CulpritSearch:
    """Find the sites whose updates keep group sums from verifying, asking about groups >= m.

    ``known_failing``: the sum of all ``sites`` is already known to fail (the aggregate the
    sites refused), so it is not asked again; otherwise it is asked first.
    """
    return _Search(sites, oracle, min_group_size).run(known_failing)


def verifier_for(
    group: Sequence[str], sites: Sequence[str], *, turn: int = 0, exclude: Sequence[str] = ()
) -> str | None:
    """A site outside ``group`` (and ``exclude``) to check the group's sum, taken in turn.

    A site inside the group could subtract its own update from the sum; a different site per
    ``turn`` spreads what the checks show. None when every site is in the group.
    """
    skip = set(group) | set(exclude)
    candidates = [s for s in sites if s not in skip]
    return candidates[turn % len(candidates)] if candidates else None


class _Search:
    def __init__(self, sites: Sequence[str], oracle: Oracle, min_group_size: int) -> None:
        if isinstance(min_group_size, bool) or not isinstance(min_group_size, int):
            raise TypeError(f"min_group_size must be an int, got {min_group_size!r}")
        if min_group_size < 2:
            raise GroupTooSmall(
                f"min_group_size = {min_group_size}: a group of one site is that site's update "
                "alone; use at least 2 (he.min_group_size)"
            )
        self.sites = tuple(sites)
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites are not distinct: {list(self.sites)}")
        self.order = {s: i for i, s in enumerate(self.sites)}
        self.oracle = oracle
        self.m = min_group_size
        self.honest: list[str] = []
        self.culprits: list[str] = []
        self.undetermined: list[str] = []
        self.checks: list[GroupCheck] = []
        self.defective: list[tuple[str, ...]] = []  # disjoint unproven sets, each has a culprit
        self.pending: list[tuple[str, ...]] = []  # unproven sets of unknown status
        self.bootstrapped = False
        self.known_failed: list[set[str]] = []  # groups known to fail without asking
        self.limit = 2 * len(self.sites) ** 2 + 4  # far above any path; guards against a bug

    # -- the oracle, guarded
    def ask(self, group: Sequence[str]) -> bool:
        members = tuple(sorted(set(group), key=self.order.__getitem__))
        if len(members) < self.m:
            raise GroupTooSmall(f"refusing to ask about {len(members)} site(s) (< {self.m})")
        if len(self.checks) >= self.limit:
            raise RuntimeError("culprit search did not converge (a bug): giving up")
        passed = bool(self.oracle(members))
        self.checks.append(GroupCheck(members, passed))
        if passed:
            known = set(self.honest)
            self.honest.extend(s for s in members if s not in known)
        return passed

    def pad(self, size: int) -> list[str] | None:
        """Honest sites that bring a group of ``size`` unproven sites up to m (None: too few)."""
        need = max(0, self.m - size)
        return self.honest[:need] if len(self.honest) >= need else None

    def run(self, known_failing: bool) -> CulpritSearch:
        if known_failing:
            self.defective.append(self.sites)
            self.known_failed.append(set(self.sites))
        else:
            self.pending.append(self.sites)
        while self.defective or self.pending:
            if self.defective:
                self.narrow(self.defective.pop())
            elif not self.test_pending() and not self.bootstrap():
                # too few honest sites to test the kept ones with, and none to be found
                self.undetermined.extend(s for part in self.pending for s in part)
                self.pending.clear()
        sites = self.sites
        return CulpritSearch(
            sites=sites,
            min_group_size=self.m,
            culprits=tuple(s for s in sites if s in set(self.culprits)),
            honest=tuple(s for s in sites if s in set(self.honest)),
            undetermined=tuple(s for s in sites if s in set(self.undetermined)),
            checks=tuple(self.checks),
        )

    def test_pending(self) -> bool:
        """Test every kept site at once; False when there are too few honest sites to pad."""
        union = tuple(s for part in self.pending for s in part)
        if not union:
            self.pending.clear()
            return True
        pad = self.pad(len(union))
        if pad is None:
            return False
        self.pending.clear()
        if not self.ask([*union, *pad]):
            self.defective.append(union)
        return True

    def narrow(self, suspects: tuple[str, ...]) -> None:
        """Shrink a set that holds a culprit by one test (or record it as found or stuck)."""
        n = len(suspects)
        if n == 1:
            self.culprits.append(suspects[0])
            return
        size = max(n // 2, self.m - len(self.honest))
        if size < n:
            first, rest = suspects[:size], suspects[size:]
            pad = self.pad(size)
            assert pad is not None  # size + len(honest) >= m by the choice of size
            if self.ask([*first, *pad]):
                self.defective.append(rest)
            else:
                self.pending.append(rest)
                self.defective.append(first)
            return
        # Too few honest sites to pad any proper part of the set up to m.
        if self.pending and self.test_pending():
            self.defective.insert(0, suspects)  # retry once the kept sites are tested
            return
        if self.leave_one_out(suspects):
            return
        self.defective.insert(0, suspects)
        if not self.bootstrap():
            self.defective.remove(suspects)
            self.undetermined.extend(suspects)

    def leave_one_out(self, suspects: tuple[str, ...]) -> bool:
        """Test "suspects without x", filled up with kept sites, for each x: the x whose test
        verifies is the culprit. False if none verifies (more than one culprit) or too few
        sites are kept to fill the tests up to m."""
        kept = [s for part in self.pending for s in part]
        need = self.m - (len(suspects) - 1) - len(self.honest)
        if need > len(kept):
            return False
        fill = kept[:need]  # need >= 1: else a proper part of the set could have been padded
        for x in suspects:
            others = [s for s in suspects if s != x]
            if self.ask([*others, *fill, *self.honest]):
                self.culprits.append(x)
                self.prune()
                return True
        return False

    def bootstrap(self) -> bool:
        """Find m honest sites to pad with, by testing m-subsets of the unproven sites.

        Needed only with several culprits, when every test so far failed; supersets of a
        failed group are skipped (they fail too), and at most ``2·K`` subsets are tried, once.
        """
        if self.bootstrapped:
            return False
        self.bootstrapped = True
        proven = set(self.honest) | set(self.culprits) | set(self.undetermined)
        unproven = [s for s in self.sites if s not in proven]
        failed = [*self.known_failed, *(set(c.group) for c in self.checks if not c.passed)]
        budget = 2 * len(self.sites)
        for combo in itertools.combinations(unproven, self.m):
            if budget == 0:
                break
            if any(f <= set(combo) for f in failed):
                continue
            budget -= 1
            if self.ask(combo):
                self.prune()
                return True
            failed.append(set(combo))
        return False

    def prune(self) -> None:
        """Drop proven sites from the kept and suspect sets (a suspect set keeps its culprit:
        only honest sites leave it)."""
        proven = set(self.honest) | set(self.culprits)
        self.pending = [
            p for p in (tuple(s for s in q if s not in proven) for q in self.pending) if p
        ]
        self.defective = [
            d for d in (tuple(s for s in q if s not in proven) for q in self.defective) if d
        ]
