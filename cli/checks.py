"""Checks of a validated experiment that its TOML schema cannot make (``fedcl.config`` imports no
other fedcl package, so CKKS arithmetic is asked of ``fedcl.privacy.ckks`` here)."""

from __future__ import annotations

from fedcl.config import ConfigError, ExperimentConfig


def check_experiment(experiment: ExperimentConfig, source: str) -> ExperimentConfig:
    """Refuse, naming ``source`` and the field, an HE packing that cannot sum exactly."""
    if experiment.he.enabled:
        from fedcl.privacy.ckks import check_packing  # numpy only: no torch, no TenSEAL

        try:
            check_packing(experiment.he)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return experiment
