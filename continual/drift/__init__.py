"""Drift at a site: is this window of the site's data still like the data the model was trained on?

A monitor compares the site's *current window* with its *reference* (a sample of the data of the
task the federation is training) through the global model: on a low-dimensional projection of
the model's embeddings (the input of its last linear layer) and on the distribution of its
predicted classes (docs/DESIGN.md §12). Pure numpy; the model is run by the site
(``fedcl.client.drift_site``).

* :mod:`.detectors`: the tests, each a statistic of (reference, window) — ``mmd`` (distance of
  the mean embeddings, i.e. MMD with a linear kernel; a permutation test), ``ks`` (the largest
  per-dimension Kolmogorov–Smirnov distance; Bonferroni over the dimensions), ``kl`` / ``psi``
  (histograms on reference-quantile bins; the seeds' fixed ``KL > 0.15`` rule), the total
  variation of the predicted-class frequencies and the largest move of one class's rate.
* :mod:`.calibration`: the default threshold, the ``quantile`` (99 %) of the statistic over the
  site's own no-drift bootstrap — keyed subsamples of the reference against the rest of it.
* :mod:`.monitor`: one window's assessment and what may leave the site: two scores and their
  alert bits, with Gaussian noise under DP (:func:`drift_release` states the release the site
  charges to its ledger *before* computing anything; the sensitivity argument is there).
"""

from .calibration import subsample_masks
from .detectors import DETECTORS, Detector, get_detector, project
from .monitor import (
    RELEASED_KEYS,
    Calibration,
    DriftRelease,
    DriftReport,
    DriftSettings,
    assess,
    calibrate,
    drift_release,
    planned_drift_releases,
    settings_of,
)

__all__ = [
    "DETECTORS",
    "RELEASED_KEYS",
    "Calibration",
    "Detector",
    "DriftRelease",
    "DriftReport",
    "DriftSettings",
    "assess",
    "calibrate",
    "drift_release",
    "get_detector",
    "planned_drift_releases",
    "project",
    "settings_of",
    "subsample_masks",
]
