"""Site-rounds a run lost, and why: counted once for results.json, the CLI and the dashboard.

A run whose schedule finished is ``completed`` (the registry's status), but one in which sites
failed, refused or were rejected is not a plain success: its training and consolidation rounds
went on without them. :func:`lost_site_rounds` counts those site-rounds from the recorded
participations (the last word on each site in each round and phase: a reply first accepted and
then found to be a culprit counts as rejected), by status and by reason — a refusal by the rule
that said no (:func:`fedcl.config.vocabulary.refusal_rule`), a failure or rejection by its
detail. Evaluation replies are not site-rounds: a site that evaluates nothing (DP withheld)
loses no training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedcl.config.vocabulary import Phase, SiteStatus, refusal_rule

COUNTED_PHASES = (Phase.TRAIN, Phase.CONSOLIDATE)
_SHORT = 90


@dataclass(frozen=True)
class LostSiteRounds:
    """How many of a run's site-rounds (train and consolidate) did not contribute, and why."""

    site_rounds: int = 0
    failed: int = 0
    refused: int = 0
    rejected: int = 0
    #: ``"refused: privacy.epsilon_budget"`` or ``"failed: <detail>"`` -> site-rounds.
    reasons: dict[str, int] = field(default_factory=dict)
    #: site -> site-rounds it lost.
    sites: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.failed + self.refused + self.rejected

    def to_dict(self) -> dict[str, Any]:
        """The ``lost_site_rounds`` object of ``results.json``."""
        return {
            "total": self.total,
            "site_rounds": self.site_rounds,
            "failed": self.failed,
            "refused": self.refused,
            "rejected": self.rejected,
            "reasons": dict(self.reasons),
            "sites": dict(self.sites),
        }

    def describe(self) -> str:
        """One line: ``"12 of 75 site-rounds lost: 9 failed (...), 3 refused (...)"``."""
        if not self.total:
            return f"no site-round lost (of {self.site_rounds})"
        parts = []
        for status, n in (("failed", self.failed), ("refused", self.refused),
                          ("rejected", self.rejected)):  # fmt: skip
            if not n:
                continue
            why = [
                f"{reason.split(': ', 1)[1]} ×{count}"
                for reason, count in self.reasons.items()
                if reason.startswith(f"{status}: ")
            ]
            parts.append(f"{n} {status} ({'; '.join(why)})")
        return f"{self.total} of {self.site_rounds} site-rounds lost: " + ", ".join(parts)


def reason_of(status: str, detail: str | None) -> str:
    """The reason a lost site-round is counted under: the refusal's rule, else the detail."""
    detail = (detail or "").strip()
    if status == SiteStatus.REFUSED:
        return f"{status}: {refusal_rule(detail)}"
    short = detail if len(detail) <= _SHORT else detail[: _SHORT - 1] + "…"
    return f"{status}: {short or 'no detail'}"


def lost_site_rounds(participations: Iterable[Any]) -> LostSiteRounds:
    """Count the lost train/consolidate site-rounds of a run's participations (any order).

    Each participation needs ``id``, ``round_id``, ``site_id``, ``phase``, ``status`` and
    ``detail`` (``fedcl.server.registry.ParticipationInfo``).
    """
    last: dict[tuple[int, str, str], Any] = {}
    for p in sorted(participations, key=lambda p: p.id):
        if p.phase in COUNTED_PHASES:
            last[(p.round_id, p.site_id, p.phase)] = p
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    sites: Counter[str] = Counter()
    for p in last.values():
        if p.status == SiteStatus.OK:
            continue
        statuses[p.status] += 1
        reasons[reason_of(p.status, p.detail)] += 1
        sites[p.site_id] += 1
    return LostSiteRounds(
        site_rounds=len(last),
        failed=statuses[SiteStatus.FAILED],
        refused=statuses[SiteStatus.REFUSED],
        rejected=statuses[SiteStatus.REJECTED],
        reasons=dict(reasons.most_common()),
        sites=dict(sorted(sites.items())),
    )
