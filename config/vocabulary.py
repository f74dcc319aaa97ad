"""The words both sides and the registry agree on: statuses, round kinds, version states, metrics.

Each is a :class:`enum.StrEnum`, so a member *is* its string (``SiteStatus.OK == "ok"``): the
wire, the database and the dashboard keep the plain strings, while code names the member and a
typo is an ``AttributeError`` instead of a silent mismatch. This module is the one owner of these
words; ``protocol`` re-exports the site statuses under their historical names.
"""

from __future__ import annotations

from enum import StrEnum


class SiteStatus(StrEnum):
    """How one site's reply to one round went (what ``participations.status`` records)."""

    OK = "ok"
    FAILED = "failed"  # the site could not do the round (bad data, crash, no reply in time)
    REFUSED = "refused"  # the site would not (its privacy budget or policy)
    REJECTED = "rejected"  # the coordinator dropped the reply (failed validation)


class RefusalRule(StrEnum):
    """Why a site refused a round: the setting that said no (the start of a refusal's detail).

    A refusal's detail names its rule in words a person reads and this enum's value, which
    :func:`refusal_rule` finds again, so a run's lost rounds can be counted by reason.
    """

    BUDGET = "privacy.epsilon_budget"  # the site's lifetime budget would be exceeded
    REQUIRE_DP = "privacy.require_dp"  # the experiment has DP off (or evaluates in clear)
    MIN_NOISE = "privacy.min_noise_multiplier"  # the release's σ is below the site's least σ
    MAX_EPSILON_PER_RUN = "privacy.max_epsilon_per_run"  # the run would spend more than that
    DP_PLAN = "dp.min_expected_batch"  # no DP-SGD sampling plan fits the task's N


def refusal_rule(detail: str) -> str:
    """The :class:`RefusalRule` a refusal's detail names first, or ``"other"``."""
    found = [(detail.find(rule.value), rule.value) for rule in RefusalRule if rule.value in detail]
    return min(found)[1] if found else "other"


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class RoundKind(StrEnum):
    """What a server round does: train the model, consolidate a task (EWC's Fisher), or watch.

    ``monitor`` rounds sit between two tasks when the next one opens on drift
    (``drift.action = "new-task"``): the sites only report drift on the model they hold.
    """

    TRAIN = "train"
    CONSOLIDATE = "consolidate"
    MONITOR = "monitor"


class RoundStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class Phase(StrEnum):
    """Which message of a round a participation answers."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    CONSOLIDATE = "consolidate"


class VersionState(StrEnum):
    """A model version's place in its rollout."""

    CANDIDATE = "candidate"
    PRODUCTION = "production"
    ARCHIVED = "archived"
    ROLLED_BACK = "rolled_back"


class VersionKind(StrEnum):
    """What a model version holds: only a ``model`` has a rollout (can become production).

    A ``fisher`` is a consolidated task's summed Fisher (EWC's input, sent with every round);
    a ``release`` is a site's decrypted copy of an encrypted model version (``fedcl site
    release``), the plaintext a coordinator can take into use.
    """

    MODEL = "model"
    FISHER = "fisher"
    RELEASE = "release"


class Metric(StrEnum):
    """Names of the metrics the coordinator records per round (and per task / site)."""

    ACCURACY = "accuracy"
    LOSS = "loss"
    BASELINE_ACCURACY = "baseline_accuracy"
    BASELINE_LOSS = "baseline_loss"
    TRAIN_LOSS = "train_loss"
    #: Standard deviation of a federation accuracy's DP noise (noised evaluation only).
    ACCURACY_NOISE_SD = "accuracy_noise_sd"
    BASELINE_ACCURACY_NOISE_SD = "baseline_accuracy_noise_sd"
    #: Seconds the coordinator spent aggregating a round's replies (a ciphertext sum under HE).
    AGGREGATE_SECONDS = "aggregate_seconds"
    #: Under HE, the sites' mean seconds to decrypt the model they were sent and to encrypt
    #: their update (what the ``he`` block of results.json reports per round).
    HE_DECRYPT_SECONDS = "he_decrypt_seconds"
    HE_ENCRYPT_SECONDS = "he_encrypt_seconds"
    #: The model's number of values (a run-level row): what bytes per parameter divide by.
    MODEL_PARAMETERS = "model_parameters"


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The plain strings of an enum, in declaration order (for checks and database enums)."""
    return tuple(member.value for member in enum)
