"""Experiment and site configs: every mistake names the file and the field."""

from __future__ import annotations

import pytest

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig, load_toml, validate_mapping
from fedcl.config.loading import apply_overrides
from fedcl.simulations.catalog import builtin_scenarios, load_scenario


def test_builtin_scenarios_validate() -> None:
    names = set(builtin_scenarios())
    assert {"digits-domain-il", "digits-class-il", "digits-task-il", "defects-domain-il"} <= names
    for name in names:
        label, exp = load_scenario(name)
        assert label == name and exp.name == name


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_scenario("digits-domain-il", ["train.rounds_per_tsk=2"])
    msg = str(err.value)
    assert "digits-domain-il.toml" in msg and "train.rounds_per_tsk" in msg and "unknown key" in msg


def test_bad_value_names_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"field 'data.partition.alpha'.*greater than 0.*-1"):
        load_scenario("digits-domain-il", ["data.partition.alpha=-1"])


def test_unknown_scenario_lists_builtins() -> None:
    with pytest.raises(ConfigError, match="digits-class-il"):
        load_scenario("no-such-scenario")


def test_overrides_parse_toml_values() -> None:
    data = apply_overrides({}, ["a.b=3", "a.c=0.5", "a.d=true", "e=hello", "f=[1, 2]"])
    assert data == {"a": {"b": 3, "c": 0.5, "d": True}, "e": "hello", "f": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_folder_experiment_needs_declared_metadata() -> None:
    with pytest.raises(ConfigError, match="class_names"):
        validate_mapping(ExperimentConfig, {"data": {"dataset": "folder"}}, "exp.toml")


def test_site_config_errors_name_file(tmp_path) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text('site_id = "a b"\nstate_dir = "/tmp/x"\n[data]\nsource = "folder"\n')
    with pytest.raises(ConfigError) as err:
        load_toml(SiteConfig, bad)
    assert str(bad) in str(err.value) and "site_id" in str(err.value)
    assert "path" in str(err.value)  # folder source without a path
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such config file"):
        load_toml(SiteConfig, missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("site_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(SiteConfig, broken)
