"""When the sites find the round's encrypted aggregate corrupt: ask them about group sums.

A site that decrypts an aggregate whose checksum fails says so (``aggregate-corrupt`` in its
reply). The coordinator cannot look inside a ciphertext, so it finds the culprit the only way
it can without decrypting anyone's update alone: it forms sums of groups of at least
``he.min_group_size`` sites and asks one site *outside* each group whether that sum verifies
(a ``query.verify`` message; the reply is one bit). The strategy runs the search
(``RoundStrategy.recover``); this module is the message round trip it uses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedcl.config import FedclError
from fedcl.config import protocol as P
from fedcl.strategies import Aggregate, Evaluation, SiteDirectory
from fedcl.strategies.contract import Verify


def reports_corrupt(evaluation: Evaluation) -> list[str]:
    """The sites that found the aggregate they were sent corrupt."""
    return [o.site_id for o in evaluation.outcomes if o.extras.get(P.AGGREGATE_CORRUPT)]


def site_verifier(
    send: Callable[[list[Message]], list[Message]],
    config: ConfigRecord,
    sites: SiteDirectory,
    result: Aggregate,
) -> Verify:
    """``verify(group, arrays, meta)``: ask a contributing site outside ``group``, in turn."""
    from fedcl.privacy.ckks.culprit import verifier_for

    candidates = [o.site_id for o in result.contributors]
    turn = itertools.count()

    def verify(group: tuple[str, ...], arrays: ArrayRecord, meta: ConfigRecord) -> bool:
        site = verifier_for(group, candidates, turn=next(turn))
        node = sites.node(site) if site is not None else None
        if node is None:
            raise FedclError(f"no site outside the group {list(group)} can check its sum")
        content = RecordDict({P.ARRAYS: arrays, P.HE_META: meta, P.CONFIG: config})
        replies = send([Message(content, node, P.VERIFY)])
        if not replies or replies[0].has_error():
            raise FedclError(f"site {site} did not answer whether the group sum verifies")
        metrics = replies[0].content.metric_records.get(P.METRICS)
        if metrics is None or P.VERIFIED not in metrics:
            raise FedclError(f"site {site} could not check the group sum")
        return int(metrics[P.VERIFIED]) == 1

    return verify
