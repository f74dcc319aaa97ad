"""Privacy at the sites: DP-SGD (Opacus), the site privacy ledger, and CKKS (TenSEAL) keys and codec."""  # noqa: E501

from .dp import (
    GRAD_SAMPLE_MODES,
    DPConfigError,
    DPHook,
    SamplingPlan,
    check_sample_rate,
    choose_grad_sample_mode,
    noise_from_spec,
    plan_noise,
    planned_release,
    sampling_plan,
)
from .ledger import (
    DPRelease,
    LedgerEntry,
    LedgerError,
    LedgerSummary,
    PrivacyLedger,
    SpendDecision,
    compose_epsilon,
)

__all__ = [
    "GRAD_SAMPLE_MODES",
    "DPConfigError",
    "DPHook",
    "DPRelease",
    "LedgerEntry",
    "LedgerError",
    "LedgerSummary",
    "PrivacyLedger",
    "SamplingPlan",
    "SpendDecision",
    "check_sample_rate",
    "choose_grad_sample_mode",
    "compose_epsilon",
    "noise_from_spec",
    "plan_noise",
    "planned_release",
    "sampling_plan",
]
