"""Experiment and site configuration (TOML validated with pydantic), shared by both sides.

Lives below every other subpackage because the coordinator and the sites both read it and must
not import each other.
"""
