"""Finding and loading scenarios: a built-in name or a path to an experiment TOML."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fedcl.config import ConfigError, ExperimentConfig, apply_overrides, read_toml, validate_mapping
from fedcl.config.experiment import pin_explicit_training

DEFAULT_SCENARIO = "digits-domain-il"


def _builtin_dir() -> Path:
    return Path(str(resources.files("fedcl.simulations.scenarios")))


def builtin_scenarios() -> dict[str, Path]:
    """Name -> TOML path of every scenario shipped with fedcl."""
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.toml"))}


def scenario_path(name_or_path: str) -> Path:
    """Resolve a built-in name or an existing file; anything else names the valid choices."""
    builtins = builtin_scenarios()
    if name_or_path in builtins:
        return builtins[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such scenario file")
        return path
    raise ConfigError(
        f"unknown scenario {name_or_path!r}: use a path to an experiment TOML or one of "
        f"{', '.join(builtins)} (see `fedcl simulate --list`)"
    )


def load_scenario(
    name_or_path: str = DEFAULT_SCENARIO, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[str, ExperimentConfig]:
    """(scenario label, validated experiment) with ``--set`` overrides applied."""
    path = scenario_path(name_or_path)
    # A --set train.lr (batch_size, momentum, ema) is the user's: it holds under DP too.
    data = pin_explicit_training(apply_overrides(read_toml(path), overrides), overrides)
    source = f"{path.name}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
    label = path.stem if path.parent == _builtin_dir() else str(path)
    return label, validate_mapping(ExperimentConfig, data, source)
