"""Aggregation of site updates: subclasses of Flower's message-API strategies."""

from .fedavg import SiteAwareMixin, SiteFedAvg, SiteFedProx
from .outcomes import SiteDirectory, SiteOutcome, record_bytes

__all__ = [
    "SiteAwareMixin",
    "SiteDirectory",
    "SiteFedAvg",
    "SiteFedProx",
    "SiteOutcome",
    "record_bytes",
]
