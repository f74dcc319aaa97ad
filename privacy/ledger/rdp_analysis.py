"""Opacus' RDP analysis (``opacus/accountants/analysis/rdp.py``) without ``import opacus``.

The ledger composes ε with Opacus' own ``compute_rdp`` and ``get_privacy_spent``: that module
needs only NumPy and SciPy, but importing it the usual way runs ``opacus/__init__``, which
imports torch, ``torch.distributed`` and SciPy's statistics: ~2 CPU-seconds. Every
``fedcl site status`` (an administrator's first command, and what the tests poll) paid that for
a sum over a few dozen numbers. So the module's file is loaded on its own when Opacus has not
been imported yet; in a process that has (a ClientApp training with DP-SGD), it is the very
module Opacus uses. Either way the code that runs is Opacus', unchanged.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (``opacus/accountants/rdp.py``), the orders the ledger
#: composes at. That module cannot load without the package; tests/test_ledger.py checks that
#: this is the same list.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

_OPACUS_MODULE = "opacus.accountants.analysis.rdp"
_STANDALONE = "fedcl.privacy.ledger._opacus_rdp_analysis"


def rdp_analysis() -> ModuleType:
    """Opacus' ``opacus.accountants.analysis.rdp`` module (``compute_rdp``,
    ``get_privacy_spent``), loaded from its file if Opacus itself is not imported."""
    for name in (_OPACUS_MODULE, _STANDALONE):
        module = sys.modules.get(name)
        if module is not None:
            return module
    package = importlib.util.find_spec("opacus")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise ImportError("opacus is not installed: the privacy ledger composes ε with it")
    path = Path(list(package.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location(_STANDALONE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Opacus' RDP analysis from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_STANDALONE] = module
    return module
