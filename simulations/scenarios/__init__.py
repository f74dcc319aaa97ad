"""Built-in scenarios: one TOML file each, listed by ``fedcl simulate --list``."""
