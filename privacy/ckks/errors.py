"""Errors of the CKKS layer, each a :class:`~fedcl.config.FedclError` the CLI prints as is.

They are split by *who must act*: a key-custody mistake (wrong file, loose file mode), a packing
setting that cannot be exact, a site update that must not be encrypted, a reply the coordinator
drops, and an aggregate a site refuses to apply (:class:`AggregateIntegrityError` when its
contents are corrupt, so that a culprit search can tell it from a protocol mistake).
"""

from __future__ import annotations

from fedcl.config import FedclError


class CKKSError(FedclError):
    """Base of every CKKS error."""


class CKKSKeyError(CKKSError, KeyError):
    """A key file that is missing, of the wrong kind, or stored unsafely.

    It is also a ``KeyError`` so callers that treat "wrong key" generically can catch it; its
    message is printed plainly (``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CKKSConfigError(CKKSError, ValueError):
    """CKKS parameters or packing settings that would not give exact encrypted sums."""


class UpdateError(CKKSError, ValueError):
    """A site update that must not be encrypted (NaN/inf, wrong layout, no examples)."""


class ReplyRejected(CKKSError):
    """A site reply the coordinator drops; ``reason`` is what the audit log records."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AggregateError(CKKSError):
    """An encrypted aggregate a site cannot decode into a trustworthy average."""


class AggregateIntegrityError(AggregateError):
    """A decrypted aggregate whose contents are corrupt: its slots are not integers, or its
    checksum does not match its values (:mod:`.integrity`).

    One of the summed updates was damaged after its site checksummed it (a flipped bit in
    memory, on the wire or at the coordinator). Every site sees the same failure; which site
    sent the damaged update is what :mod:`.culprit` finds out.
    """


class GroupTooSmall(CKKSError, ValueError):
    """A group sum over fewer sites than ``he.min_group_size`` (:mod:`.culprit`): refused, so
    that no check during a culprit search concerns fewer sites than that."""
