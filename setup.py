"""Maps every top-level code folder into the ``fedcl`` namespace (docs/DESIGN.md §1).

``fedcl.server`` lives in ``server/``, ``fedcl.client`` in ``client/``, and so on. Listing the
packages here (rather than by hand in pyproject.toml) keeps new subpackages from being forgotten.
"""

import os

from setuptools import setup

ROOTS = [
    "cli",
    "client",
    "config",
    "continual",
    "datasets",
    "models",
    "privacy",
    "server",
    "simulations",
    "strategies",
]
DATA_SUFFIXES = (".toml", ".ini", ".mako", ".html", ".js", ".css", ".typed", ".json", ".svg")

packages: list[str] = []
package_dir: dict[str, str] = {}
package_data: dict[str, list[str]] = {}
for root in ROOTS:
    package_dir[f"fedcl.{root}"] = root
    for dirpath, _dirs, files in os.walk(root):
        if "__pycache__" in dirpath:
            continue
        if "__init__.py" in files:
            name = "fedcl." + dirpath.replace(os.sep, ".")
            packages.append(name)
            data = [f for f in files if f.endswith(DATA_SUFFIXES)]
            if data:
                package_data[name] = data

setup(packages=packages, package_dir=package_dir, package_data=package_data)
