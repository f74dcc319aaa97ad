"""Built-in datasets that need no download, so demos, tests and simulations run offline.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (real data, one domain; with the
``domains`` option the same images under other intensities or contrasts, for drift).
``defects`` is a procedurally generated industrial surface-inspection set whose domains
(material x lighting) give domain-incremental and domain-skewed federations something real to
adapt to: the same four defect classes look different on brushed steel under dim light than on
fabric under bright light, and each material's clean texture holds a look-alike of a defect seen
on another (wood knots, concrete pores, odd fabric threads), so learning the materials one at a
time forgets. Both are deterministic, so every virtual site can regenerate the same dataset from
its seed and keep only its own shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .dataset import DEFAULT_DOMAIN, DataError, LabeledImages

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "defects", "captioned-defects", "captioned-digits")

DEFECT_CLASSES: tuple[str, ...] = ("none", "scratch", "spot", "crack")
MATERIALS: tuple[str, ...] = ("steel", "wood", "concrete", "fabric")
LIGHTINGS: tuple[str, ...] = ("bright", "dim")

# RGB tint per material for channels=3 (luminance carries the texture and the defect).
_TINTS: dict[str, tuple[float, float, float]] = {
    "steel": (0.86, 0.90, 1.00),
    "wood": (1.00, 0.76, 0.50),
    "concrete": (0.95, 0.95, 0.92),
    "fabric": (0.62, 0.74, 1.00),
}
# Colour cast per lighting for channels=3: the dim line is lit by warm tungsten lamps.
_CASTS: dict[str, np.ndarray] = {
    "bright": np.ones(3, dtype=np.float32),
    "dim": np.asarray((1.0, 0.86, 0.7), dtype=np.float32),
}
Arr = np.ndarray
Rng = np.random.Generator
_DEFECTS_OPTIONS = ("n_per_class_per_domain", "image_size", "channels", "materials", "lightings")


def load_builtin(name: str, *, seed: int = 0, **options: Any) -> LabeledImages:
    """Load (or generate) a built-in dataset by name; ``options`` are dataset-specific.

    Unknown names and options raise :class:`DataError` listing what is valid, so a typo in an
    experiment file is reported instead of silently falling back to defaults.
    """
    key = str(name).strip().lower()
    if key == "digits":
        unknown = sorted(set(options) - {"domains"})
        if unknown:
            raise DataError(
                f"built-in dataset 'digits' takes only the option 'domains' (a subset of "
                f"{', '.join(DIGIT_DOMAINS)}); got {unknown}. Remove them from data.options."
            )
        if "domains" in options:
            return digits_domains(options["domains"])
        return _load_digits()
    if key == "defects":
        unknown = sorted(set(options) - set(_DEFECTS_OPTIONS))
        if unknown:
            raise DataError(
                f"unknown option(s) {unknown} for built-in dataset 'defects'; "
                f"valid options: {', '.join(_DEFECTS_OPTIONS)}"
            )
        return make_defects(seed=seed, **options)
    if key in ("captioned-defects", "captioned-digits"):  # compositions, some held out (§11)
        from .captions import load_captioned

        return load_captioned(key, seed=seed, **options)
    raise DataError(
        f"unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN_DATASETS)} "
        "(or use a folder / CSV manifest for your own images)"
    )


def _load_digits() -> LabeledImages:
    """scikit-learn's 1797 8x8 digits; pixel values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return LabeledImages(
        x=x,
        y=y,
        domain=np.zeros(len(y), dtype=np.int64),
        class_names=tuple(str(c) for c in bunch.target_names),
        domain_names=(DEFAULT_DOMAIN,),
    )


#: Intensity / contrast versions of the digits (the pixel map applied to values in [0, 1]).
DIGIT_DOMAINS: dict[str, tuple[float, float]] = {
    "original": (0.0, 1.0),  # x
    "dim": (0.0, 0.5),  # 0.5 x: half the light
    "low-contrast": (0.3, 0.4),  # 0.3 + 0.4 x: a washed-out sensor
}


def digits_domains(domains: Sequence[str] | str) -> LabeledImages:
    """The digits once per domain of ``domains`` (``DIGIT_DOMAINS``: an affine pixel map each).

    Deterministic (no randomness at all): domain ``d`` holds every image as ``a + b·x``, so a
    stream can move a site from ``original`` to ``low-contrast`` mid-run (a drift scenario).
    """
    names = [domains] if isinstance(domains, str) else [str(d).strip().lower() for d in domains]
    bad = [d for d in names if d not in DIGIT_DOMAINS]
    if bad or not names or len(set(names)) != len(names):
        raise DataError(
            f"digits option domains={list(names)!r} is not valid; choose distinct names "
            f"among: {', '.join(DIGIT_DOMAINS)}"
        )
    base = _load_digits()
    xs, ys, doms = [], [], []
    for i, name in enumerate(names):
        offset, scale = DIGIT_DOMAINS[name]
        xs.append((offset + scale * base.x).astype(np.float32))
        ys.append(base.y)
        doms.append(np.full(len(base.y), i, dtype=np.int64))
    return LabeledImages(
        x=np.concatenate(xs),
        y=np.concatenate(ys),
        domain=np.concatenate(doms),
        class_names=base.class_names,
        domain_names=tuple(names),
    )


# --------------------------------------------------------------------------------------------
# defects: procedural surface-inspection images
# --------------------------------------------------------------------------------------------


def _check_choice(
    field: str, values: Sequence[str] | str | None, valid: tuple[str, ...]
) -> list[str]:
    """Validate a materials / lightings option and return it in the canonical order."""
    if values is None:
        return list(valid)
    if isinstance(values, str):
        values = [values]
    values = [str(v).strip().lower() for v in values]
    bad = [v for v in values if v not in valid]
    if bad or not values:
        raise DataError(
            f"defects option {field}={values!r} is not valid; "
            f"choose a non-empty subset of: {', '.join(valid)}"
        )
    return [v for v in valid if v in values]


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise DataError(f"defects option {field} must be an integer in [{lo}, {hi}]; got {value!r}")
    return int(value)


def make_defects(
    *,
    seed: int = 0,
    n_per_class_per_domain: int = 60,
    image_size: int = 32,
    channels: int = 1,
    materials: Sequence[str] | str | None = None,
    lightings: Sequence[str] | str | None = None,
) -> LabeledImages:
    """Generate the ``defects`` dataset: 4 defect classes on material x lighting domains.

    Every (material, lighting, class) group draws from its own random stream keyed by the seed
    and the group's position in the *full* material / lighting lists, so restricting ``materials``
    or ``lightings`` yields exactly the same images for the domains that remain. Examples are
    ordered by domain, then class.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer; got {seed!r}")
    n = _check_int("n_per_class_per_domain", n_per_class_per_domain, 1, 100_000)
    size = _check_int("image_size", image_size, 8, 512)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"defects option channels must be 1 or 3; got {channels!r}")
    mats = _check_choice("materials", materials, MATERIALS)
    lights = _check_choice("lightings", lightings, LIGHTINGS)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs, ys = [], []
    domain_names = []
    for mat in mats:
        for light in lights:
            domain_names.append(f"{mat}/{light}")
            for ci in range(len(DEFECT_CLASSES)):
                key = [int(seed), MATERIALS.index(mat), LIGHTINGS.index(light), ci]
                rng = np.random.default_rng(key)
                img = _TEXTURES[mat](rng, n, size, xx, yy)
                if ci:
                    img += _DEFECTS[ci](rng, n, size, xx, yy)
                img = _light(rng, light, img, xx, yy, size)
                if channels == 3:
                    tint = np.asarray(_TINTS[mat], dtype=np.float32) * _CASTS[light]
                    img = img[:, None] * tint[None, :, None, None]
                    img += 0.01 * rng.standard_normal(img.shape, dtype=np.float32)
                else:
                    img = img[:, None]
                xs.append(np.clip(img, 0.0, 1.0))
                ys.append(np.full(n, ci, dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32, copy=False)
    y = np.concatenate(ys)
    domain = np.repeat(np.arange(len(domain_names), dtype=np.int64), n * len(DEFECT_CLASSES))
    return LabeledImages(
        x=x, y=y, domain=domain, class_names=DEFECT_CLASSES, domain_names=tuple(domain_names)
    )


def _u(rng: Rng, lo: float, hi: float, n: int) -> np.ndarray:
    """Per-image uniform parameter shaped ``(n, 1, 1)`` to broadcast over pixels."""
    return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)


def _noise(rng: Rng, n: int, size: int) -> np.ndarray:
    return rng.standard_normal((n, size, size), dtype=np.float32)


def _box(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Circular moving average of width ``k`` along ``axis`` (cumsum, so O(pixels))."""
    k = max(1, int(k))
    head = np.take(a, np.arange(k), axis=axis)
    c = np.cumsum(np.concatenate([a, head], axis=axis), axis=axis)
    m = a.shape[axis]
    upper = np.take(c, np.arange(k, k + m), axis=axis)
    lower = np.take(c, np.arange(0, m), axis=axis)
    return (upper - lower) / k


def _unit(a: np.ndarray) -> np.ndarray:
    """Rescale each image to zero mean and unit standard deviation."""
    a = a - a.mean(axis=(1, 2), keepdims=True)
    return a / (a.std(axis=(1, 2), keepdims=True) + 1e-6)


def _blobs(
    rng: Rng, n: int, k: int, xx: Arr, yy: Arr, radius: tuple[float, float], ecc: float = 1.0
) -> Arr:
    """``k`` soft discs per image (radius in pixels), summed; ``(n, H, W)`` in [0, k]."""
    size = xx.shape[0]
    cx = rng.uniform(0, size, (n, k, 1, 1)).astype(np.float32)
    cy = rng.uniform(0, size, (n, k, 1, 1)).astype(np.float32)
    r = rng.uniform(*radius, (n, k, 1, 1)).astype(np.float32)
    d = np.sqrt(((xx - cx) * ecc) ** 2 + ((yy - cy) / ecc) ** 2)
    return np.clip(r + 0.5 - d, 0.0, 1.0).sum(axis=1)


def _steel(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """Brushed steel: fine streaks along a near-horizontal brushing direction."""
    streak = _unit(_box(_noise(rng, n, size), size // 3, axis=2))
    # Shear rows by a per-image slope so the brushing direction varies a little.
    slope = rng.uniform(-0.25, 0.25, n)
    shift = np.rint(slope[:, None] * np.arange(size)[None, :]).astype(np.int64)  # (n, rows)
    cols = (np.arange(size)[None, None, :] + shift[:, :, None]) % size
    streak = np.take_along_axis(streak, cols, axis=2)
    return _u(rng, 0.5, 0.62, n) + _u(rng, 0.04, 0.07, n) * streak + 0.015 * _noise(rng, n, size)


def _wood(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """Wood: low-frequency grain bands, gently warped, at a random small angle, with knots.

    A knot is a dark, soft, elongated blob: the texture's own "spot", which a model that learnt
    spots on another material must learn to ignore here (one source of forgetting).
    """
    s = size / 32
    theta = _u(rng, -0.35, 0.35, n)
    warp = _u(rng, 0.5, 2.5, n) * np.sin(
        2 * np.pi * _u(rng, 0.5, 1.5, n) * xx / size + _u(rng, 0, 2 * np.pi, n)
    )
    u = (yy * np.cos(theta) + xx * np.sin(theta) + warp) / size
    f = _u(rng, 2.5, 4.5, n)
    phase = _u(rng, 0, 2 * np.pi, n)
    grain = np.sin(2 * np.pi * f * u + phase) + 0.3 * np.sin(6 * np.pi * f * u + 2 * phase)
    # Knots: elongated along the grain (across the bands' normal), Gaussian edge.
    kx, ky = _u(rng, 0.15 * size, 0.85 * size, n), _u(rng, 0.15 * size, 0.85 * size, n)
    along = (xx - kx) * np.cos(theta) - (yy - ky) * np.sin(theta)
    across = (xx - kx) * np.sin(theta) + (yy - ky) * np.cos(theta)
    rc = _u(rng, 1.5, 2.2, n) * s
    ra = rc * _u(rng, 1.7, 2.3, n)
    knot = np.clip(2.0 * (1.0 - np.sqrt((along / ra) ** 2 + (across / rc) ** 2)), 0.0, 1.0)
    has_knot = (rng.random((n, 1, 1)) < 0.7).astype(np.float32)
    return (
        _u(rng, 0.45, 0.55, n)
        + _u(rng, 0.06, 0.1, n) * grain
        - has_knot * _u(rng, 0.25, 0.45, n) * knot
        + 0.015 * _noise(rng, n, size)
    )


def _concrete(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """Concrete: speckle on low-frequency blotches, with dark pores and pale aggregate flecks.

    Pores and flecks are small discs of either polarity: the texture's own tiny "spots".
    """
    s = size / 32
    k = max(2, size // 6)
    blotch = _unit(_box(_box(_noise(rng, n, size), k, 1), k, 2))
    pores = _blobs(rng, n, 4, xx, yy, (0.5 * s, 1.1 * s))
    flecks = _blobs(rng, n, 3, xx, yy, (0.5 * s, 1.0 * s))
    return (
        _u(rng, 0.45, 0.58, n)
        + 0.04 * blotch
        + _u(rng, 0.04, 0.07, n) * _noise(rng, n, size)
        - 0.2 * np.minimum(pores, 1.0)
        + 0.15 * np.minimum(flecks, 1.0)
    )


def _fabric(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """Fabric: a woven checker of over/under threads, and sometimes one odd-coloured thread.

    The odd thread runs the whole width along the weave: the texture's own "scratch".
    """
    phi = _u(rng, -0.4, 0.4, n)
    u = xx * np.cos(phi) + yy * np.sin(phi)
    v = -xx * np.sin(phi) + yy * np.cos(phi)
    period = _u(rng, 3.2, 4.8, n) * size / 32
    w = 2 * np.pi / period
    weave = np.sin(w * u) * np.sin(w * v) + 0.4 * (np.sin(w * u) + np.sin(w * v))
    # One thread (a row or column of the weave) of another shade, full length.
    pick = np.where(rng.random((n, 1, 1)) < 0.5, u, v)
    offset = _u(rng, 0.3 * size, 0.7 * size, n)
    thread = _stroke(np.abs(pick - offset), 0.3 * period)
    has_thread = (rng.random((n, 1, 1)) < 0.6).astype(np.float32)
    return (
        _u(rng, 0.45, 0.55, n)
        + _u(rng, 0.05, 0.08, n) * weave
        + has_thread * _sign(rng, n) * _u(rng, 0.15, 0.3, n) * thread
        + 0.015 * _noise(rng, n, size)
    )


_TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "steel": _steel,
    "wood": _wood,
    "concrete": _concrete,
    "fabric": _fabric,
}

#: Thinnest stroke half-width in pixels, whatever the image size: below it a scratch or crack
#: is an anti-aliased ghost (at 16 px the size-scaled widths were 0.15-0.35 px: invisible).
_MIN_HALF_WIDTH = 0.45


def _stroke(d: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Anti-aliased stroke profile from a distance map: 1 inside, linear 1-pixel falloff."""
    return np.clip(half_width + 0.5 - d, 0.0, 1.0)


def _sign(rng: Rng, n: int) -> np.ndarray:
    return np.where(rng.random((n, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)


def _scratch(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """A thin, long, straight line at a random angle; brighter or darker than the surface."""
    s = size / 32
    cx, cy = _u(rng, 0.3 * size, 0.7 * size, n), _u(rng, 0.3 * size, 0.7 * size, n)
    theta = _u(rng, 0, np.pi, n)
    length = _u(rng, 0.5 * size, 0.8 * size, n)
    dx, dy = xx - cx, yy - cy
    across = np.abs(-dx * np.sin(theta) + dy * np.cos(theta))
    along = np.abs(dx * np.cos(theta) + dy * np.sin(theta))
    width = np.maximum(_u(rng, 0.4, 0.8, n) * s, _MIN_HALF_WIDTH)
    mask = _stroke(across, width) * np.clip(length / 2 + 0.5 - along, 0, 1)
    return _sign(rng, n) * _u(rng, 0.3, 0.5, n) * mask


def _spot(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """A round (slightly elliptic) blob with a crisp edge; brighter or darker than the surface."""
    s = size / 32
    cx, cy = _u(rng, 0.2 * size, 0.8 * size, n), _u(rng, 0.2 * size, 0.8 * size, n)
    r = np.maximum(_u(rng, 2.0, 3.6, n) * s, 1.2)
    ecc = _u(rng, 0.8, 1.25, n)
    d = np.sqrt(((xx - cx) * ecc) ** 2 + ((yy - cy) / ecc) ** 2)
    return _sign(rng, n) * _u(rng, 0.3, 0.5, n) * np.clip(r + 0.5 - d, 0, 1)


def _segment_distance(xx: Arr, yy: Arr, a: Arr, b: Arr) -> Arr:
    """Distance from every pixel to segments a->b; a, b are ``(n, 2)``, result ``(n, H, W)``."""
    ax, ay = a[:, 0, None, None], a[:, 1, None, None]
    ex, ey = (b - a)[:, 0, None, None], (b - a)[:, 1, None, None]
    t = np.clip(((xx - ax) * ex + (yy - ay) * ey) / (ex * ex + ey * ey + 1e-6), 0.0, 1.0)
    return np.hypot(xx - ax - t * ex, yy - ay - t * ey)


def _crack(rng: Rng, n: int, size: int, xx: Arr, yy: Arr) -> Arr:
    """A dark jagged polyline (zig-zag around a drifting heading) with a thinner side branch."""
    s = size / 32

    def walk(p: Arr, heading: Arr, steps: int, step_len: tuple[float, float]) -> tuple[Arr, ...]:
        """Distance map of a zig-zag walk from ``p``; also returns its first-third vertex."""
        dist = np.full((n, size, size), np.inf, dtype=np.float32)
        drift, fork = heading, p
        for step in range(steps):
            drift = drift + rng.normal(0, 0.25, n)
            h = drift + rng.normal(0, 0.8, n)
            q = p + (rng.uniform(*step_len, n) * s)[:, None] * np.stack([np.cos(h), np.sin(h)], 1)
            dist = np.minimum(dist, _segment_distance(xx, yy, p, q))
            if step == steps // 3:
                fork = q
            p = q
        return dist, fork, drift

    # Start in the middle and walk both ways so the crack stays mostly inside the image.
    start = rng.uniform(0.3 * size, 0.7 * size, (n, 2)).astype(np.float32)
    heading = rng.uniform(0, 2 * np.pi, n)
    d1, fork, drift = walk(start, heading, 5, (1.8, 3.0))
    d2, _, _ = walk(start, heading + np.pi, 5, (1.8, 3.0))
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    d3, _, _ = walk(fork, drift + side * rng.uniform(0.6, 1.3, n), 4, (1.6, 2.6))
    width = np.maximum(_u(rng, 0.45, 0.8, n) * s, _MIN_HALF_WIDTH)
    mask = np.maximum(_stroke(np.minimum(d1, d2), width), 0.8 * _stroke(d3, 0.75 * width))
    return -_u(rng, 0.3, 0.5, n) * mask


_DEFECTS: dict[int, Callable[..., np.ndarray]] = {1: _scratch, 2: _spot, 3: _crack}


def _light(rng: Rng, lighting: str, img: Arr, xx: Arr, yy: Arr, size: int) -> Arr:
    """Apply the lighting: bright is even; dim is darker, noisier and has a linear gradient."""
    n = img.shape[0]
    if lighting == "bright":
        out = img * _u(rng, 0.95, 1.1, n) + _u(rng, 0.05, 0.12, n)
        return out + 0.01 * _noise(rng, n, size)
    angle = _u(rng, 0, 2 * np.pi, n)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    gradient = 1.0 - _u(rng, 0.3, 0.5, n) * np.clip(ramp, 0, 1)
    out = img * _u(rng, 0.55, 0.7, n) * gradient + 0.02
    return out + 0.025 * _noise(rng, n, size)
