"""Splitting one dataset across virtual sites, and each site's data into train and test.

Simulations and demos carve a built-in dataset into sites whose data differ the way real sites
do: ``iid`` (no skew, the baseline), ``dirichlet`` (label skew: each site sees a different class
mix) and ``domain`` (feature skew: each site owns whole domains, like a factory with its own
materials or a hospital with its own scanner). Everything is deterministic from ``seed`` so every
site process computes the same partition and keeps only its own shard.
"""

from __future__ import annotations

import math

import numpy as np

from .dataset import DataError

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "domain")
MAX_DIRICHLET_TRIES = 200


def partition_indices(
    y: np.ndarray,
    num_sites: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    domain: np.ndarray | None = None,
    seed: int = 0,
    min_per_site: int = 10,
) -> list[np.ndarray]:
    """Disjoint, sorted index arrays, one per site, that together cover every example.

    ``iid`` shuffles and splits evenly. ``dirichlet`` draws, per class, site proportions from
    ``Dir(alpha)`` (smaller ``alpha``, stronger label skew) and redraws until every site has at
    least ``min_per_site`` examples. ``domain`` gives the k-th domain present in ``domain`` (in
    index order) to site ``k % num_sites``, so each domain lives on exactly one site.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array; got shape {y.shape}")
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise DataError(f"partition.num_sites must be an integer >= 1; got {num_sites!r}")
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"partition.scheme {scheme!r} is not valid; "
            f"choose one of: {', '.join(PARTITION_SCHEMES)}"
        )
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise DataError(
            f"partition.alpha must be a finite number > 0 (e.g. 0.1 strong skew, 100 near-iid); "
            f"got {alpha!r}"
        )
    if min_per_site < 0:
        raise DataError(f"partition.min_per_site must be >= 0; got {min_per_site}")
    n = len(y)
    rng = np.random.default_rng(seed)

    if scheme == "domain":
        return _by_domain(n, num_sites, domain)
    if n < num_sites * min_per_site:
        raise DataError(
            f"cannot give {num_sites} sites at least {min_per_site} examples each from only {n} "
            "examples; lower partition.num_sites or generate more data"
        )
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_sites)]
    return _dirichlet(y, num_sites, alpha, rng, min_per_site)


def _by_domain(n: int, num_sites: int, domain: np.ndarray | None) -> list[np.ndarray]:
    if domain is None:
        raise DataError(
            "partition.scheme 'domain' needs a domain index per example; this dataset has none "
            "(use scheme 'dirichlet' or 'iid')"
        )
    domain = np.asarray(domain)
    if domain.shape != (n,):
        raise DataError(f"domain must have shape ({n},) to match the labels; got {domain.shape}")
    present = np.unique(domain)
    if len(present) < num_sites:
        raise DataError(
            f"partition.scheme 'domain' needs at least as many domains as sites: the data has "
            f"{len(present)} domain(s) but partition.num_sites is {num_sites}. Lower num_sites "
            "to at most the number of domains, or use scheme 'dirichlet' for label skew instead."
        )
    site_of_domain = {int(d): k % num_sites for k, d in enumerate(present)}
    site = np.fromiter((site_of_domain[int(d)] for d in domain), dtype=np.int64, count=n)
    return [np.flatnonzero(site == s) for s in range(num_sites)]


def _dirichlet(
    y: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator, min_per_site: int
) -> list[np.ndarray]:
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_sites, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].append(chunk)
        sites = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(len(s) for s in sites)
        if smallest >= min_per_site:
            return [s.astype(np.int64, copy=False) for s in sites]
    raise DataError(
        f"partition.scheme 'dirichlet' with alpha={alpha} over {num_sites} sites left a site with "
        f"fewer than min_per_site={min_per_site} examples in {MAX_DIRICHLET_TRIES} draws (last "
        f"smallest site: {smallest}); alpha or num_sites is too extreme for {len(y)} examples. "
        "Raise partition.alpha, lower partition.num_sites or lower min_per_site."
    )


def train_test_split_indices(
    n: int,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    stratify: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint ``(train, test)`` indices covering ``range(n)``, deterministic by seed.

    With ``stratify`` each group (class, or any integer key such as class x domain) is split in
    the same proportion, so a small site's test set still contains every class it has. A group
    of one example stays in train; any group of two or more puts at least one in each part.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be strictly between 0 and 1; got {test_fraction}")
    if n < 2:
        raise DataError(f"need at least 2 examples to split into train and test; got {n}")
    rng = np.random.default_rng(seed)
    if stratify is None:
        groups = [np.arange(n)]
    else:
        stratify = np.asarray(stratify)
        if stratify.shape != (n,):
            raise DataError(f"stratify must have shape ({n},); got {stratify.shape}")
        groups = [np.flatnonzero(stratify == g) for g in np.unique(stratify)]
    test: list[np.ndarray] = []
    for idx in groups:
        if len(idx) < 2:
            continue
        k = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(rng.permutation(idx)[:k])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else np.empty(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx
