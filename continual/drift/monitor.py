"""One window's drift assessment, and the only thing about it that leaves the site.

**What leaves.** Two scores and their alert bits (:data:`RELEASED_KEYS`): ``drift-score`` (the
distribution test; it alerts when the score exceeds 1) and ``drift-rate-shift`` (the largest
move of one predicted class's rate against the reference; it alerts above
``drift.trigger.rate_change``). Statistics, thresholds, window sizes and p-values stay in the
site's log.

**Without DP** the score is ``max_c s_c / τ_c`` over the channels ``c`` (the embedding
detector, and with the bootstrap also the predicted-class total variation), each threshold
``τ_c`` the ``1 − α/C`` quantile of the site's own no-drift bootstrap (``α = 1 − quantile``,
Bonferroni over the ``C`` channels: a window of stable data alerts with probability ≤ α). With
``calibration = "fixed"`` it is ``s / threshold`` (the seeds' ``KL > 0.15``); with ``"test"``
it is ``α / p`` for the detector's own p-value.

**Under DP** (experiment ``dp.enabled``) the release is one Gaussian mechanism, stated by
:func:`drift_release` and charged to the site's ledger *before* the site computes anything:

* Inputs. The window is the keyed bottom-``n`` of the site's data of the task it sees, the
  reference the next ``N`` of the current task's data in the same keyed order (or the bottom
  ``N`` of another pool): adding or removing one example of the site's data changes each by at
  most one *substitution* (one example in, one out: the keyed bottom-k argument of
  docs/DESIGN.md §7). Features are clipped to L2 norm ``C`` (``drift.clip_norm``) after the fixed,
  data-independent random projection; the detector must have a per-example bound ``u``
  (:meth:`Detector.unit`: ``2C`` for ``mmd``, 1 for ``ks`` and for the class frequencies).
* Sensitivity of ``v_c = s_c − τ_c``. A substitution in the window moves ``s_c`` by ``u/n``;
  one in the reference moves ``s_c`` by ``u/N`` and every bootstrap subsample ``S_b`` (keyed
  bottom-``n`` of the reference, :mod:`.calibration`) and its rest by at most two substitutions
  each, so every bootstrap statistic, hence their quantile ``τ_c``, by ``2u/n + 2u/(N−n)``.
  Altogether ``Δ_c = u·(3/n + 1/N + 2/(N−n))`` (:func:`sensitivity`), whichever sample the
  example is in.
* The released vector is ``(max_c v_c/Δ_c, r/Δ_r)`` with ``r`` the rate shift
  (``Δ_r = 1/n + 1/N``): each coordinate moves by at most 1, the vector by ``√2`` in L2. The site
  adds ``N(0, (σ·√2)²)`` to each (``σ = drift.noise_multiplier``): a Gaussian mechanism with
  noise multiplier ``σ`` over the site's whole data, charged as one step at sample rate 1 (the
  ledger composes it with everything else the site releases, over its whole history). A
  substitution is two add/remove steps, but both the window and the reference are keyed
  bottom-k samples, so one *added or removed* example makes exactly the substitutions counted
  above: the bound is for add/remove adjacency, the accountant's.
* What is released is post-processing of that vector: ``score = (v + η)/(z·σ√2)`` with
  ``z = Φ⁻¹(1 − α/2)``, alert iff ``score > 1``; the channels' thresholds are the
  ``1 − α/(2C)`` quantiles. On stable data a window alerts with probability ≤ α (union bound:
  α/2 for the statistics, α/2 for the noise). ``rate_shift = (r/Δ_r + η')·Δ_r``.

A fixed threshold or a p-value has no such bound: under DP only ``calibration = "bootstrap"``
with the random projection and a detector with a bound is accepted (``config.experiment``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcl.config import ConfigError
from fedcl.config import protocol as P

from .calibration import subsample_masks, threshold
from .detectors import (
    class_frequencies,
    clip_rows,
    get_detector,
    rate_shift,
    subsample_total_variation,
    total_variation,
)

if TYPE_CHECKING:
    from fedcl.config import ExperimentConfig
    from fedcl.continual.plan import RunPlan

#: The only drift numbers a site's reply carries.
RELEASED_KEYS = (P.DRIFT_SCORE, P.DRIFT_ALERT, P.DRIFT_RATE_SHIFT, P.DRIFT_RATE_ALERT)
#: L2 sensitivity of the released vector (two coordinates, each moved by at most 1).
RELEASE_SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True)
class DriftSettings:
    """The monitor's settings at a site (from the experiment's ``[drift]``; see ``settings_of``)."""

    detector: str = "ks"
    calibration: str = "bootstrap"
    threshold: float | None = None
    quantile: float = 0.99
    bootstrap: int = 500
    bins: int = 10
    clip_norm: float = 4.0
    #: σ of the DP release; None: no DP (nothing is noised or charged).
    noise_multiplier: float | None = None
    rate_change: float | None = None

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None

    def check(self) -> None:
        detector = get_detector(self.detector)
        if self.calibration == "fixed" and self.threshold is None:
            raise ConfigError("field 'drift.threshold': calibration = 'fixed' needs a threshold")
        if self.dp:
            if not detector.dp:
                raise ConfigError(
                    f"field 'drift.detector': {self.detector!r} has no sensitivity bound, so "
                    "it cannot run under DP; use 'mmd' or 'ks'"
                )
            if self.calibration != "bootstrap":
                raise ConfigError(
                    f"field 'drift.calibration': {self.calibration!r} cannot run under DP "
                    "(only the keyed bootstrap has a sensitivity bound); use 'bootstrap'"
                )


def settings_of(experiment: ExperimentConfig) -> DriftSettings:
    """The experiment's ``[drift]`` as the monitor reads it (DP from ``dp.enabled``)."""
    spec = experiment.drift
    return DriftSettings(
        detector=spec.detector,
        calibration=spec.calibration,
        threshold=spec.threshold,
        quantile=spec.quantile,
        bootstrap=spec.bootstrap,
        bins=spec.bins,
        clip_norm=spec.clip_norm,
        noise_multiplier=spec.noise_multiplier if experiment.dp.enabled else None,
        rate_change=spec.trigger.rate_change,
    )


@dataclass(frozen=True)
class DriftRelease:
    """What one DP drift report costs, in the terms the site's ledger composes.

    One Gaussian mechanism (noise multiplier ``σ`` relative to the L2 sensitivity ``√2`` of the
    normalised vector) over the site's data: ``sample_rate = 1.0``, ``steps = 1``.
    """

    mechanism: str = "drift"
    sample_rate: float = 1.0
    noise_multiplier: float = 0.0
    steps: int = 1
    sensitivity: float = RELEASE_SENSITIVITY

    def to_dict(self) -> dict:
        return asdict(self)


def drift_release(settings: DriftSettings) -> DriftRelease:
    """The release :func:`assess` makes under DP with these settings, known beforehand."""
    if not settings.dp:
        raise ConfigError("a drift report without DP makes no privacy release")
    settings.check()
    return DriftRelease(noise_multiplier=float(settings.noise_multiplier))


def planned_drift_releases(
    experiment: ExperimentConfig, plan: RunPlan
) -> list[tuple[float, float, int]]:
    """``(σ, 1, 1)`` per drift report the run can ask of a site under DP (none otherwise).

    One after every training round and one per monitoring round (an upper bound: monitoring
    rounds after a trigger are skipped).
    """
    if not (experiment.drift.enabled and experiment.dp.enabled):
        return []
    from fedcl.config.vocabulary import RoundKind

    count = sum(s.kind in (RoundKind.TRAIN, RoundKind.MONITOR) for s in plan.schedule)
    return [(float(experiment.drift.noise_multiplier), 1.0, 1)] * count


def sensitivity(unit: float, n: int, n_ref: int) -> float:
    """``Δ = u·(3/n + 1/N + 2/(N − n))`` of ``s − τ`` for one added or removed example."""
    if not 0 < n < n_ref:
        raise ValueError(f"need 0 < window ({n}) < reference ({n_ref})")
    return unit * (3.0 / n + 1.0 / n_ref + 2.0 / (n_ref - n))


@dataclass(frozen=True)
class Calibration:
    """The bootstrap thresholds of one reference for windows of ``n``: embedding, predictions."""

    n: int
    tau: float
    tau_tv: float


def _channel_share(settings: DriftSettings) -> float:
    """Each channel's false-alarm share of α: Bonferroni over 2 channels (and the noise)."""
    alpha = 1.0 - settings.quantile
    return alpha / 4 if settings.dp else alpha / 2


def calibrate(
    reference: np.ndarray,
    reference_predictions: np.ndarray,
    n: int,
    num_classes: int,
    settings: DriftSettings,
    *,
    key: bytes,
) -> Calibration:
    """The no-drift bootstrap of ``reference`` (already clipped under DP) for windows of ``n``."""
    detector = get_detector(settings.detector)
    ref = np.asarray(reference, dtype=np.float64)
    masks = subsample_masks(ref, n, settings.bootstrap, key)
    q = 1 - _channel_share(settings)
    tau = threshold(detector.subsample_statistics(ref, masks, bins=settings.bins), q)
    onehot = np.eye(num_classes)[np.asarray(reference_predictions, dtype=np.int64)]
    return Calibration(n, tau, threshold(subsample_total_variation(onehot, masks), q))


@dataclass(frozen=True)
class DriftReport:
    """One window's assessment; only :meth:`released` leaves the site."""

    score: float
    alert: bool
    rate_shift: float
    rate_alert: bool
    #: Kept at the site (its log): the channels' statistics and thresholds, sizes, noise.
    local: dict[str, Any] = field(default_factory=dict)

    def released(self) -> dict[str, float]:
        return {
            P.DRIFT_SCORE: float(self.score),
            P.DRIFT_ALERT: float(bool(self.alert)),
            P.DRIFT_RATE_SHIFT: float(self.rate_shift),
            P.DRIFT_RATE_ALERT: float(bool(self.rate_alert)),
        }


def assess(
    reference: np.ndarray,
    window: np.ndarray,
    reference_predictions: np.ndarray,
    window_predictions: np.ndarray,
    num_classes: int,
    settings: DriftSettings,
    *,
    key: bytes,
    generator: np.random.Generator | None = None,
    calibration: Calibration | None = None,
) -> DriftReport:
    """Compare ``window`` with ``reference`` (projected features, ``(n, k)`` and ``(N, k)``).

    ``key`` keys the bootstrap subsamples (the site's secret; see :mod:`.calibration`);
    ``calibration`` reuses the bootstrap of the same reference (benchmarks: a site recomputes it).
    ``generator`` draws the DP noise; None seeds one from the OS's entropy (pass a seeded one
    only in tests: whoever knows the seed can subtract the noise).
    """
    settings.check()
    detector = get_detector(settings.detector)
    ref = np.asarray(reference, dtype=np.float64)
    win = np.asarray(window, dtype=np.float64)
    n, n_ref = len(win), len(ref)
    if n < 2 or n_ref <= n:
        raise ValueError(f"a window of {n} needs a larger reference, got {n_ref}")
    if settings.dp:
        ref, win = clip_rows(ref, settings.clip_norm), clip_rows(win, settings.clip_norm)
    p_ref = class_frequencies(reference_predictions, num_classes)
    p_win = class_frequencies(window_predictions, num_classes)
    shift = rate_shift(p_win, p_ref)
    alpha = 1.0 - settings.quantile
    stat = detector.statistic(ref, win, bins=settings.bins)
    local: dict[str, Any] = {"n": n, "n_ref": n_ref, "statistic": stat}

    if settings.calibration == "fixed":
        score = stat / float(settings.threshold)  # type: ignore[arg-type]
        local["threshold"] = settings.threshold
    elif settings.calibration == "test":
        p = detector.p_value(ref, win)
        score = alpha / max(p, 1e-300)
        local["p_value"] = p
    else:
        if calibration is None or calibration.n != n:
            calibration = calibrate(ref, reference_predictions, n, num_classes, settings, key=key)
        tau, tau_tv = calibration.tau, calibration.tau_tv
        tv = total_variation(p_win, p_ref)
        local.update(threshold=tau, tv=tv, tv_threshold=tau_tv)
        if not settings.dp:
            score = max(stat / max(tau, 1e-12), tv / max(tau_tv, 1e-12))
        else:
            unit = detector.unit(settings.clip_norm)
            v = max(
                (stat - tau) / sensitivity(unit, n, n_ref),
                (tv - tau_tv) / sensitivity(1.0, n, n_ref),
            )
            sd = float(settings.noise_multiplier) * RELEASE_SENSITIVITY
            gen = generator or np.random.default_rng(secrets.randbits(63))
            margin = NormalDist().inv_cdf(1 - alpha / 2) * sd
            score = (v + gen.normal(0.0, sd)) / margin
            d_rate = 1.0 / n + 1.0 / n_ref
            shift = max(0.0, (shift / d_rate + gen.normal(0.0, sd)) * d_rate)
            local.update(noise_sd=sd, rate_noise_sd=sd * d_rate)
    rate_alert = settings.rate_change is not None and shift > settings.rate_change
    return DriftReport(float(score), bool(score > 1.0), float(shift), bool(rate_alert), local)
