"""Sites across runs: what they did, the privacy spend they reported, their hash checks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from fedcl.config import protocol as P
from fedcl.config.vocabulary import Phase, SiteStatus
from fedcl.server.registry import (
    AuditInfo,
    MetricInfo,
    ParticipationInfo,
    PrivacyInfo,
    Registry,
    SiteInfo,
)

from ..auth import Principal
from ..floats import finite
from ..schemas import HashAgreementOut, SiteDetail, SiteOut, SiteRunOut
from .audit import AUDIT_SCAN
from .runs import all_runs

MODEL_AGREEMENT = f"{P.MODEL_SHA256}-agreement"
# A site's rounds are counted from the phases that train (evaluation is not a round's work).
TRAIN_PHASES = (Phase.TRAIN, Phase.CONSOLIDATE)


def _is_hash_related(name: str) -> bool:
    return "hash" in name.lower()


class _SiteFacts:
    """Everything the registry says about sites, gathered once per request across all runs."""

    def __init__(self, registry: Registry, site_ids: set[str]) -> None:
        self.runs = all_runs(registry)
        self.parts: dict[str, dict[str, list[ParticipationInfo]]] = defaultdict(dict)
        self.privacy: dict[str, list[PrivacyInfo]] = defaultdict(list)
        self.hash_metric: dict[str, MetricInfo] = {}
        self.hash_events: dict[str, list[AuditInfo]] = defaultdict(list)
        # The federation-level check (server/recording.py): 1.0 when every site held the model.
        self.run_agreement: dict[str, MetricInfo] = {}
        for run in reversed(self.runs):  # oldest first, so "latest" wins below
            by_site: dict[str, list[ParticipationInfo]] = defaultdict(list)
            for p in registry.list_participations(run.id):
                if p.site_id in site_ids:
                    by_site[p.site_id].append(p)
            for site_id, rows in by_site.items():
                self.parts[site_id][run.id] = rows
            for p in registry.list_privacy(run.id):
                if p.site_id in site_ids:
                    self.privacy[p.site_id].append(p)
            for m in registry.list_metrics(run.id):
                if m.site_id in site_ids and _is_hash_related(m.name):
                    self.hash_metric[m.site_id] = m
                elif m.site_id is None and m.name == MODEL_AGREEMENT:
                    self.run_agreement[run.id] = m
        for event in reversed(registry.list_audit(limit=AUDIT_SCAN)):
            if event.site_id in site_ids and _is_hash_related(event.kind + " " + event.message):
                self.hash_events[event.site_id].append(event)

    def hash_agreement(self, site_id: str) -> HashAgreementOut | None:
        metric = self.hash_metric.get(site_id)
        if metric is None:  # the latest run the site took part in that checked the hashes
            checked = [r for r in self.parts.get(site_id, {}) if r in self.run_agreement]
            metric = self.run_agreement[checked[-1]] if checked else None
        events = self.hash_events.get(site_id, [])
        if metric is None and not events:
            return None
        return HashAgreementOut(
            metric=metric.name if metric else None,
            value=metric.value if metric else None,
            run_id=metric.run_id if metric else None,
            server_round=metric.server_round if metric else None,
            audit_events=len(events),
            last_event=f"{events[-1].kind}: {events[-1].message}" if events else None,
        )


def _site_counts(parts: Iterable[ParticipationInfo]) -> tuple[int, int, int]:
    """(ok, failed, refused) rounds: distinct rounds in the train/consolidate phases."""
    by_status: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for p in parts:
        if p.phase in TRAIN_PHASES:
            key = SiteStatus.FAILED if p.status == SiteStatus.REJECTED else p.status
            by_status[key].add((p.run_id, p.server_round))
    return (
        len(by_status[SiteStatus.OK]),
        len(by_status[SiteStatus.FAILED]),
        len(by_status[SiteStatus.REFUSED]),
    )


def _site_summary(facts: _SiteFacts, site: SiteInfo) -> dict[str, Any]:
    """The fields of :class:`SiteOut`, from the site's snapshot and the gathered facts."""
    per_run = facts.parts.get(site.id, {})
    everything = [p for rows in per_run.values() for p in rows]
    ok, failed, refused = _site_counts(everything)
    last = max(everything, key=lambda p: p.created_at, default=None)
    privacy = facts.privacy.get(site.id, [])
    latest = max(privacy, key=lambda p: (p.created_at, p.id), default=None)
    lifetime = finite(latest.epsilon_lifetime) if latest else None
    budget = finite(latest.budget) if latest else None
    return {
        **dict(site),
        "runs": len(per_run),
        "rounds_ok": ok,
        "rounds_failed": failed,
        "rounds_refused": refused,
        "last_run_id": last.run_id if last else None,
        "last_server_round": last.server_round if last else None,
        "epsilon_run": latest.epsilon_run if latest else None,
        "epsilon_lifetime": lifetime,
        "budget": budget,
        "budget_used": lifetime / budget if lifetime is not None and budget else None,
        "hash_agreement": facts.hash_agreement(site.id),
    }


def site_list(registry: Registry, principal: Principal) -> list[SiteOut]:
    """Every site the registry has seen (a site token: only itself)."""
    sites = [s for s in registry.list_sites() if principal.may_see_site(s.id)]
    facts = _SiteFacts(registry, {s.id for s in sites})
    return [SiteOut.model_validate(_site_summary(facts, s)) for s in sites]


def site_detail(registry: Registry, site_id: str) -> SiteDetail | None:
    """One site with its part in each run and its privacy reports, oldest first."""
    site = next((s for s in registry.list_sites() if s.id == site_id), None)
    if site is None:
        return None
    facts = _SiteFacts(registry, {site_id})
    per_run = []
    for run in facts.runs:
        rows = facts.parts.get(site_id, {}).get(run.id)
        if not rows:
            continue
        ok, failed, refused = _site_counts(rows)
        train_ok = [p for p in rows if p.phase == Phase.TRAIN and p.status == SiteStatus.OK]
        per_run.append(
            SiteRunOut(
                run_id=run.id,
                rounds_ok=ok,
                rounds_failed=failed,
                rounds_refused=refused,
                # Under HE the count travels inside the ciphertext: unknown here, not 0.
                examples=None
                if (run.config.get("he") or {}).get("enabled")
                else max((p.num_examples for p in train_ok), default=0),
                last_server_round=max(p.server_round for p in rows),
                errors=sorted({p.detail for p in rows if p.status != SiteStatus.OK and p.detail}),
            )
        )
    privacy = sorted(facts.privacy.get(site_id, []), key=lambda p: (p.created_at, p.id))
    return SiteDetail.model_validate(
        {
            **_site_summary(facts, site),
            "per_run": per_run,
            "privacy": privacy,
        }
    )
