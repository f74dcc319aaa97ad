"""Experiment and site configuration (TOML validated with pydantic), shared by both sides.

Lives below every other subpackage because the coordinator and the sites both read it and must
not import each other.
"""

from .errors import ConfigError, FedclError
from .experiment import ExperimentConfig
from .loading import apply_overrides, load_toml, read_toml, to_json, validate_mapping
from .site import DataSource, PrivacyPolicy, SiteConfig, SitePartition
from .writing import write_toml

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "FedclError",
    "SiteConfig",
    "DataSource",
    "SitePartition",
    "PrivacyPolicy",
    "apply_overrides",
    "load_toml",
    "read_toml",
    "to_json",
    "validate_mapping",
    "write_toml",
]
