"""Sorting a round's replies into sites that succeeded, failed or refused.

Flower reports a crashed ClientApp as an error message that names only a node id; our ClientApp
reports a site mistake as a *failed* status with the site id and the reason. Both end up here as
one :class:`SiteOutcome` per reply, which is what the coordinator records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Error, Message

from fedcl.config import protocol as P
from fedcl.config.vocabulary import SiteStatus

SUPERLINK_NODE_ID = 1  # Flower's: the SuperLink signs the errors it makes up with this node id


def answered_for(sent: Iterable[Message], replies: Iterable[Message]) -> list[Message]:
    """The replies, each from the node its message went to.

    When a node misses its heartbeats, the SuperLink answers for it with an error *from itself*
    (node 1, "Node Unavailable"), so the round would record a failure of a site "node-1" that
    does not exist and none of the site that was lost. Such an error becomes the error reply of
    the node its message was sent to (Flower's own ``Message(error, reply_to=...)``).
    """
    by_id = {m.metadata.message_id: m for m in sent}
    out = []
    for reply in replies:
        original = by_id.get(reply.metadata.reply_to_message_id)
        if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID and original:
            error = Error(code=reply.error.code, reason=reply.error.reason)
            reply = Message(error, reply_to=original)
        out.append(reply)
    return out


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
    """Which site runs on which node: a reply's site is its node's, never what the reply says.

    A node is bound to a site either by the deployment (``bind``: from enrolment, where the
    SuperLink authenticated the node's key) or on first use, when a node first names itself.
    After that a reply that claims another site than its node's, or a site bound to another
    node, is *rejected* and named — so a node cannot speak (or spend ε) for another site. A
    first-use binding is forgotten when its node leaves (``forget_absent``), so a site that
    reconnects as a new node (no SuperNode authentication) is recognised again.
    """

    def __init__(self) -> None:
        self._by_node: dict[int, str] = {}
        self._by_site: dict[str, int] = {}
        self._authenticated: set[int] = set()
        self._seen: set[str] = set()  # every site that ever answered, bound or not

    def name(self, node_id: int) -> str:
        return self._by_node.get(node_id, f"node-{node_id}")

    def node(self, site_id: str) -> int | None:
        """The node a site runs on (None if it has not been seen)."""
        return self._by_site.get(site_id)

    def bind(self, node_id: int, site_id: str, *, authenticated: bool = True) -> None:
        self._by_node[node_id] = site_id
        self._by_site[site_id] = node_id
        self._seen.add(site_id)
        if authenticated:
            self._authenticated.add(node_id)

    def forget_absent(self, connected: Iterable[int]) -> list[str]:
        """The sites seen before whose nodes are not connected now (first-use bindings of
        nodes that left are dropped: a site may come back as a new node)."""
        present = set(connected)
        for node in [n for n in self._by_node if n not in present and n not in self._authenticated]:
            del self._by_site[self._by_node.pop(node)]
        here = {self._by_node[n] for n in present if n in self._by_node}
        return sorted(self._seen - here)

    def claim(self, node_id: int, site_id: str) -> str | None:
        """Bind ``node_id`` to ``site_id`` on first use; the reason if the claim is refused."""
        bound = self._by_node.get(node_id)
        if bound is not None and bound != site_id:
            return f"node {node_id} is site {bound}, but its reply claims to be site {site_id}"
        owner = self._by_site.get(site_id)
        if owner is not None and owner != node_id:
            return f"site {site_id} is node {owner}; node {node_id} claims to be it"
        if bound is None:
            self.bind(node_id, site_id, authenticated=False)
        return None

    def sort(self, replies: Iterable[Message]) -> list[SiteOutcome]:
        """One outcome per reply, in reply order, named by the reply's node."""
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
            claimed = str(site[P.SITE_ID]) if site and P.SITE_ID in site else self.name(node_id)
            problem = self.claim(node_id, claimed)
            if problem is not None:
                outcomes.append(
                    SiteOutcome(
                        self.name(node_id),
                        node_id,
                        SiteStatus.REJECTED,
                        detail=problem,
                        bytes_up=record_bytes(content),
                    )
                )
                continue
            status = str(site.get(P.STATUS, P.STATUS_OK)) if site else P.STATUS_OK
            metrics_rec = content.metric_records.get(P.METRICS)
            metrics = {k: float(v) for k, v in (metrics_rec or {}).items()}  # type: ignore[arg-type]
            outcomes.append(
                SiteOutcome(
                    claimed,
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
