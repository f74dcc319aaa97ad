"""Strategies by name: the one place ``strategy.name`` is looked up (docs/DESIGN.md §13).

Adding a strategy is one row here (a Flower strategy class, whether its aggregation is an
example-weighted sum, and which ``[strategy]`` settings it takes); the encryption wrapper and the
coordinator need no change. ``build_strategy`` waits for every expected site (Flower samples
before it waits otherwise: docs/notes/flower-1.41.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedcl.config import ConfigError, ExperimentConfig

from .contract import RoundStrategy
from .sites import SiteStrategy


@dataclass(frozen=True)
class StrategyEntry:
    """A Flower strategy class and what fedcl needs to know about it."""

    flower_class: Callable[..., Strategy]
    #: The aggregate is Σ nᵢ·wᵢ / Σ nᵢ, so it can be computed over ciphertexts.
    summable: bool
    #: ``[strategy]`` fields passed to the class, by keyword of the same name.
    options: tuple[str, ...] = field(default_factory=tuple)


STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg, summable=True),
    "fedprox": StrategyEntry(FedProx, summable=True, options=("proximal_mu",)),
}


def strategy_entry(name: str) -> StrategyEntry:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"field 'strategy.name': unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        ) from None


def build_strategy(experiment: ExperimentConfig, *, initial: Any = None) -> RoundStrategy:
    """The experiment's strategy, wrapped for encrypted aggregation when ``he.enabled``.

    ``initial`` is the run's initial ``torch.nn.Module`` (the encrypted wrapper needs its layout
    and hash; plaintext aggregation does not).
    """
    spec = experiment.strategy
    entry = strategy_entry(spec.name)
    expected = experiment.expected_sites
    kwargs: dict[str, Any] = dict(
        fraction_train=spec.fraction_train,
        fraction_evaluate=spec.fraction_evaluate,
        min_train_nodes=max(1, int(expected * spec.fraction_train)),
        min_evaluate_nodes=max(1, int(expected * spec.fraction_evaluate)),
        min_available_nodes=expected,
    )
    kwargs.update({name: getattr(spec, name) for name in entry.options})
    strategy = SiteStrategy(
        entry.flower_class(**kwargs),
        summable=entry.summable,
        max_update_norm=spec.max_update_norm,
    )
    if not experiment.he.enabled:
        return strategy
    from .encrypted import Encrypted

    return Encrypted.for_experiment(strategy, experiment, initial)
