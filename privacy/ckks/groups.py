"""Group sums for a culprit search: formed at the coordinator, checked at a site (issue 11).

The coordinator keeps every site's validated reply of the round. When the sites report a
corrupt aggregate (:class:`~.errors.AggregateIntegrityError`), :func:`recover_aggregate` runs
:func:`~.culprit.find_culprits` with an oracle that forms a group's sum (:func:`group_sum`,
public context only) and asks one site whether it verifies; that site answers with
:func:`verify_group_sum`, which decrypts the sum, checks it and reports *only* pass/fail. The
result names the culprits and carries the honest sites' sum, the round's aggregate without them.

Both ends refuse a group of fewer than ``min_group_size`` sites (:class:`GroupTooSmall`): the
coordinator never forms one, and a site never decrypts one, whoever asks.

How the question travels (a Flower message to the verifying site and its one-bit reply) is the
coordinator's: ``verify`` below is that round trip. What this defends against and what not:
:mod:`.culprit`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from .culprit import CulpritSearch, find_culprits
from .errors import AggregateError, AggregateIntegrityError, GroupTooSmall
from .layout import Layout
from .meta import KIND_AGGREGATE, WireMeta
from .packing import Packing
from .sum import EncryptedSum
from .validate import ExpectedReply

#: A site's reply as the coordinator keeps it: (ciphertext blocks, metadata record).
Reply = tuple[ArrayRecord, ConfigRecord]
#: ``verify(group, arrays, meta) -> passed``: ask a site whether the group's sum verifies.
Verify = Callable[[tuple[str, ...], ArrayRecord, ConfigRecord], bool]


def group_sum(
    expected: ExpectedReply,
    replies: Mapping[str, Reply],
    group: Sequence[str],
    *,
    min_group_size: int,
) -> Reply:
    """The encrypted sum of ``group``'s replies, as an aggregate (metadata ``summed`` = size).

    Every reply is validated again (it was when the round summed it); a group of fewer than
    ``min_group_size`` distinct sites is refused.
    """
    members = list(dict.fromkeys(group))
    if len(members) < min_group_size:
        raise GroupTooSmall(
            f"refusing to sum a group of {len(members)} site(s): he.min_group_size is "
            f"{min_group_size}"
        )
    missing = [s for s in members if s not in replies]
    if missing:
        raise KeyError(f"no reply kept for site(s) {missing}")
    total = EncryptedSum(expected)
    for site in members:
        total.add(*replies[site])
    return total.result()


def verify_group_sum(
    arrays: ArrayRecord,
    meta: Mapping[str, Any] | None,
    secret_ctx,
    *,
    layout: Layout,
    min_group_size: int,
    packing: Packing | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> bool:
    """At a site: does this group sum decrypt to an intact aggregate? Only the bit leaves.

    True if it decodes with a matching checksum, False if its contents are corrupt
    (:class:`AggregateIntegrityError`). A sum that says (in its metadata, or in its decrypted
    contributor count) it has fewer than ``min_group_size`` sites is refused with
    :class:`GroupTooSmall` *before* decrypting; any other :class:`AggregateError` (other
    keys, layout or packing) is a protocol mistake, not a culprit, and propagates.
    """
    from .wire import decode_aggregate_full

    try:
        m = WireMeta.from_record(meta)
    except ValueError as exc:
        raise AggregateError(f"group sum metadata: {exc}") from None
    if m.kind != KIND_AGGREGATE:
        raise AggregateError(f"expected a group sum (an aggregate), got kind {m.kind!r}")
    if m.summed < min_group_size:
        raise GroupTooSmall(
            f"refusing to decrypt a sum of {m.summed} site(s): he.min_group_size is "
            f"{min_group_size}"
        )
    try:
        decoded = decode_aggregate_full(
            arrays,
            meta,
            secret_ctx,
            layout=layout,
            packing=packing,
            workers=workers,
            parallel_min_blocks=parallel_min_blocks,
        )
    except AggregateIntegrityError:
        return False
    # Decoding checked the decrypted contributor count against the metadata's (>= the minimum).
    return decoded.contributors == m.summed


@dataclass(frozen=True)
class Recovery:
    """A culprit search and the honest sites' sum (None when fewer than min_group_size)."""

    search: CulpritSearch
    arrays: ArrayRecord | None
    meta: ConfigRecord | None


def recover_aggregate(
    expected: ExpectedReply,
    replies: Mapping[str, Reply],
    verify: Verify,
    *,
    min_group_size: int,
    sites: Sequence[str] | None = None,
    known_failing: bool = True,
) -> Recovery:
    """Find the sites whose replies corrupt the sum, and sum the others.

    ``replies`` are the round's accepted replies by site; ``sites`` (default: every key of
    ``replies``, in order) those whose sum failed. ``verify`` asks a site about one group sum
    (choose a site outside the group: :func:`~.culprit.verifier_for`). The honest sum is
    formed only from >= ``min_group_size`` proven-honest sites; the sites check its checksum
    again when they decrypt it.
    """
    order = list(replies) if sites is None else list(sites)

    def oracle(group: tuple[str, ...]) -> bool:
        arrays, meta = group_sum(expected, replies, group, min_group_size=min_group_size)
        return bool(verify(group, arrays, meta))

    search = find_culprits(
        order, oracle, min_group_size=min_group_size, known_failing=known_failing
    )
    if not search.can_sum_honest:
        return Recovery(search, None, None)
    arrays, meta = group_sum(expected, replies, search.honest, min_group_size=min_group_size)
    return Recovery(search, arrays, meta)
