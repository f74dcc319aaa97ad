"""Aggregation of site updates: any Flower strategy made site-aware, and encryption as a wrapper.

* :mod:`.contract`  what a round hands a strategy and gets back (typed results, no side channels)
* :mod:`.sites`     :class:`SiteStrategy`: a Flower strategy whose replies are sorted by site
* :mod:`.encrypted` :class:`Encrypted`: CKKS validation and a ciphertext sum around a summable one
* :mod:`.table`     strategies by name (``strategy.name``), and :func:`build_strategy`
* :mod:`.outcomes`  one :class:`SiteOutcome` per reply
"""

from .contract import Aggregate, Evaluation, GlobalModel, RoundStrategy
from .outcomes import SiteDirectory, SiteOutcome, answered_for, record_bytes
from .sites import SiteStrategy, SitesUnavailable, carried_evaluation
from .table import STRATEGIES, build_strategy

__all__ = [
    "STRATEGIES",
    "Aggregate",
    "Evaluation",
    "GlobalModel",
    "RoundStrategy",
    "SiteDirectory",
    "answered_for",
    "SiteOutcome",
    "SiteStrategy",
    "SitesUnavailable",
    "build_strategy",
    "carried_evaluation",
    "record_bytes",
]
