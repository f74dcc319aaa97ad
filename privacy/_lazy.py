"""The lazy face both privacy packages share (PEP 562): a name's module loads on first use.

``fedcl.privacy`` must not load torch and Opacus for a caller that wants only the ledger, and a
spawned CKKS worker that imports ``fedcl.privacy.ckks._worker`` must load neither Flower nor
pydantic; so each package lists its public names and the module that defines them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` when ``name`` is used."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__
