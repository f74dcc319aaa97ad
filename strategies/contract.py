"""The round's one contract: what a strategy is given and what its aggregation returns.

The coordinator never reads or writes a strategy's attributes: it hands a strategy the
:class:`GlobalModel` a round starts from and gets back an :class:`Aggregate` (the new model,
its metrics and one :class:`~fedcl.strategies.outcomes.SiteOutcome` per reply, rejected replies
marked as such) or an :class:`Evaluation`. Plain and encrypted aggregation return the same types,
so nothing above this package branches on encryption.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedcl.config import protocol as P
from fedcl.config.vocabulary import SiteStatus

from .outcomes import SiteDirectory, SiteOutcome


@dataclass(frozen=True)
class GlobalModel:
    """A model as the coordinator holds it: plaintext arrays, or CKKS blocks and their metadata.

    The metadata belongs to the arrays (it says how to decrypt them), so the two travel and are
    stored together; ``meta`` is None for plaintext weights.
    """

    arrays: ArrayRecord
    meta: ConfigRecord | None = None
    #: :meth:`digest`, once computed (the round's aggregation and its recording both ask).
    _digest: list[str | None] = field(default_factory=list, init=False, repr=False, compare=False)
    #: :meth:`state`, once read (or handed over by the aggregation that computed the arrays).
    _state: list[dict[str, torch.Tensor]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    @classmethod
    def of_state(cls, arrays: ArrayRecord, state: dict[str, torch.Tensor]) -> GlobalModel:
        """A plaintext model whose weights are already at hand as tensors (an average just
        computed): :meth:`state` returns them instead of deserialising ``arrays`` again."""
        model = cls(arrays)
        model._state.append(state)
        return model

    @property
    def encrypted(self) -> bool:
        return self.meta is not None

    def state(self) -> dict[str, torch.Tensor]:
        """The plaintext weights as tensors, deserialised once per model.

        A round reads them three times (the update checks' reference, the digest, the stored
        version); each read of an :class:`ArrayRecord` parses every array's bytes again. The
        tensors are shared: callers must not change them in place (none does; a model is never
        changed in place, a round makes a new one).
        """
        if not self._state:
            self._state.append(self.arrays.to_torch_state_dict())
        return self._state[0]

    def digest(self) -> str | None:
        """The hash every site should report having trained from (None when only the sites
        can decrypt the model: then their majority is the reference).

        Computed once per model: a coordinator's models are never changed in place (a round
        makes a new one).
        """
        if not self._digest:
            from fedcl.models import state_sha256

            plain = not (self.encrypted or is_encrypted(self.arrays))
            self._digest.append(state_sha256(self.state()) if plain else None)
        return self._digest[0]


@dataclass(frozen=True)
class Aggregate:
    """What one aggregation produced: the new model (None if none was usable), and who took part."""

    model: GlobalModel | None
    outcomes: list[SiteOutcome]
    metrics: dict[str, float] = field(default_factory=dict)
    #: (site id, reason) of replies set aside without changing that site's status: a second
    #: copy of a reply already counted.
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def rejections(self) -> list[tuple[str, str]]:
        """(site id, reason) of every reply the strategy dropped after validation."""
        return [(o.site_id, o.detail) for o in self.outcomes if o.status == SiteStatus.REJECTED]

    @property
    def contributors(self) -> list[SiteOutcome]:
        return [o for o in self.outcomes if o.ok]


@dataclass(frozen=True)
class Evaluation:
    """Per-task counters pooled over sites (``correct-tJ``, ``count-tJ``, ``loss-tJ``)."""

    totals: dict[str, float]
    outcomes: list[SiteOutcome]


def is_encrypted(arrays: ArrayRecord | None) -> bool:
    """Whether an ArrayRecord holds CKKS blocks (rather than plaintext weights)."""
    if not arrays:
        return False
    first = next(iter(arrays.keys()))
    return first.startswith(P.CKKS_BLOCK_PREFIX) and arrays[first].stype == P.CKKS_BLOCK_STYPE


#: ``verify(group, arrays, meta) -> passed``: one site's verdict on a group sum of ciphertexts.
Verify = Callable[[tuple[str, ...], ArrayRecord, ConfigRecord], bool]


class RoundStrategy(Protocol):
    """What the coordinator needs of a strategy (:class:`~fedcl.strategies.sites.SiteStrategy`
    and wrappers around it such as :class:`~fedcl.strategies.encrypted.Encrypted`)."""

    sites: SiteDirectory
    min_available_nodes: int

    def await_sites(
        self, grid: Grid, server_round: int, *, wait_s: float, quorum: int
    ) -> list[str]:
        """Wait (with a deadline) for the sites; raise ``SitesUnavailable`` below the quorum.
        Returns the known sites that are not connected."""
        ...

    def configure_train(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]: ...

    def train_nodes(self, grid: Grid) -> list[int]:
        """The nodes a training round samples (for messages Flower's strategy does not build)."""
        ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], *, sent: GlobalModel
    ) -> Aggregate:
        """Aggregate the replies to ``sent`` (the model this round's messages carried)."""
        ...

    def configure_evaluate(
        self, server_round: int, model: GlobalModel, config: ConfigRecord, grid: Grid
    ) -> list[Message]: ...

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Evaluation: ...

    def sum_shares(self, server_round: int, key: str, replies: Iterable[Message]) -> Aggregate:
        """Sum a record every site sent under ``key`` (EWC's Fisher share), plain or encrypted."""
        ...

    def recover(
        self, server_round: int, result: Aggregate, *, sent: GlobalModel, verify: Verify
    ) -> Aggregate:
        """Re-aggregate without the sites whose updates corrupted ``result`` (HE only).

        ``verify(group, arrays, meta)`` asks a site whether a group sum decrypts intact.
        """
        ...

    def attach(self, messages: list[Message], key: str, model: GlobalModel) -> None:
        """Add ``model`` to every message under ``key`` (with its metadata when encrypted)."""
        ...
