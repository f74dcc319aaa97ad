"""Sorting a round's replies into sites that succeeded, failed or refused.

Flower reports a crashed ClientApp as an error message that names only a node id; our ClientApp
reports a site mistake as a *failed* status with the site id and the reason. Both end up here as
one :class:`SiteOutcome` per reply, which is what the coordinator records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from fedcl.config import protocol as P


@dataclass
class SiteOutcome:
    """What one site did in one round."""

    site_id: str
    node_id: int
    status: str
    num_examples: int = 0
    detail: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    message: Message | None = None
    extras: dict[str, str] = field(default_factory=dict)  # e.g. model-sha256, ewc-digest

    @property
    def ok(self) -> bool:
        return self.status == P.STATUS_OK


def record_bytes(content) -> int:
    """Bytes of all arrays in a RecordDict (what dominates a message on the wire)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    return total


_SITE_STANDARD = {P.SITE_ID, P.STATUS, P.DETAIL}


class SiteDirectory:
    """Remembers which site runs on which node, to name sites whose replies carry no name."""

    def __init__(self) -> None:
        self._by_node: dict[int, str] = {}

    def name(self, node_id: int) -> str:
        return self._by_node.get(node_id, f"node-{node_id}")

    def learn(self, node_id: int, site_id: str) -> None:
        self._by_node[node_id] = site_id

    def sort(self, replies: Iterable[Message]) -> list[SiteOutcome]:
        """One outcome per reply, in reply order."""
        outcomes = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                outcomes.append(
                    SiteOutcome(
                        self.name(node_id),
                        node_id,
                        P.STATUS_FAILED,
                        detail=f"ClientApp error {msg.error.code}: {msg.error.reason}",
                    )
                )
                continue
            content = msg.content
            site = content.config_records.get(P.SITE)
            site_id = str(site[P.SITE_ID]) if site and P.SITE_ID in site else self.name(node_id)
            self.learn(node_id, site_id)
            status = str(site.get(P.STATUS, P.STATUS_OK)) if site else P.STATUS_OK
            metrics_rec = content.metric_records.get(P.METRICS)
            metrics = {k: float(v) for k, v in (metrics_rec or {}).items()}  # type: ignore[arg-type]
            outcomes.append(
                SiteOutcome(
                    site_id,
                    node_id,
                    status if status in P.STATUSES else P.STATUS_FAILED,
                    num_examples=int(metrics.get(P.NUM_EXAMPLES, 0)),
                    detail=str(site.get(P.DETAIL, "")) if site else "",
                    metrics=metrics,
                    bytes_up=record_bytes(content),
                    message=msg,
                    extras={k: str(v) for k, v in (site or {}).items() if k not in _SITE_STANDARD},
                )
            )
        return outcomes
