"""Data sources: built-in datasets, folder and manifest loaders, and partitioning across sites.

Sits at the bottom of the dependency graph (beside ``models``) because the sites load examples
from it while the coordinator only asks it for a dataset's *shape* (classes, domains, image
size) to build the initial model and name the tasks.
"""

# TEMPORARY during integration: re-export until client/data moves here.
from fedcl.client.data import *  # noqa: F403,E402
from fedcl.client.data import __all__  # noqa: E402,F401
