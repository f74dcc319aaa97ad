"""Where a DP release's random draws come from: the OS, or a site's own research seed.

Every Gaussian release a site makes (DP-SGD's noise and its Poisson sampling, the EWC DP Fisher,
the noised evaluation counts, a DP drift report) draws from a generator seeded by
:func:`release_seed`, or from :mod:`secrets` where that gives None, the default: the noise must
be secret, and an experiment's seed is public (the coordinator sends it), so nothing the
coordinator knows may seed it. A site may set ``privacy.research_seed`` in its own site.toml (never
the experiment): each release's seed is then derived from it and from what names the release,
so a simulation or a test reruns bit-identically, and two runs of one experiment on the same
sites draw the same noise. That removes the privacy the noise buys against anyone who learns
the seed, so it is for simulations and tests only; a site that sets it says so in its log.

Loads no torch at import.
"""

from __future__ import annotations

import hashlib

__all__ = ["release_seed"]


def release_seed(site_seed: int | None, *names: object) -> int | None:
    """A 63-bit seed for one release, or None: draw it from the OS (the mechanism's own default).

    ``names`` identify the release within a run (its round, its kind, the task): two releases
    with the same names and site seed draw the same noise, which is right for a release made
    again (a reply that never left) and wrong for anything else, so callers name every release
    they make.
    """
    if site_seed is None:
        return None
    text = repr((int(site_seed), *names)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1
