"""Data sources: built-in datasets, folder and manifest loaders, partitioning across sites.

Whatever the source, a site's examples become one :class:`LabeledImages` (float32 images in
``[0, 1]``, int labels, a domain per example, optional explicit tasks). Built-in datasets
(``digits``, ``defects``) need no download, so simulations run offline; ``load_folder`` reads a
real site's class folders or CSV manifest; ``partition_indices`` carves one dataset into virtual
sites with iid, label-skewed or domain-skewed shards. Every problem a user can fix is raised as
:class:`DataError`, whose message names the file, row, column or field and how to fix it.

Sits at the bottom of the dependency graph (beside ``models``): the sites load examples from it,
while the coordinator only asks it for a dataset's *shape* (``info.dataset_info``: classes,
domains, image size) to build the initial model and name the tasks.
"""

from .builtin import BUILTIN_DATASETS, load_builtin
from .dataset import DataError, LabeledImages, to_tensor_dataset
from .folder import load_folder
from .partition import partition_indices, train_test_split_indices

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "LabeledImages",
    "load_builtin",
    "load_folder",
    "partition_indices",
    "to_tensor_dataset",
    "train_test_split_indices",
]
