"""Privacy at the sites: DP-SGD (Opacus), the site privacy ledger, and CKKS (TenSEAL) aggregation.

* :mod:`.dp`     DP-SGD with Opacus: noise plans, sampling plans, the training hook
* :mod:`.ledger` the site's append-only record of every release, and ε over all of them
* :mod:`.ckks`   CKKS-encrypted aggregation (keys, packing, wire format)

Names are imported lazily (PEP 562): importing ``fedcl.privacy`` or ``fedcl.privacy.ckks``
loads neither torch nor Opacus, so a spawned CKKS worker and ``fedcl --help`` stay light. Only
the names of :mod:`.dp` pull torch in, when first used.
"""

from __future__ import annotations

from ._lazy import lazy_exports

_EXPORTS = {
    "GRAD_SAMPLE_MODES": "dp",
    "DPConfigError": "dp",
    "DPHook": "dp",
    "NoSamplingPlan": "dp",
    "SamplingPlan": "dp",
    "check_sample_rate": "dp",
    "choose_grad_sample_mode": "dp",
    "noise_from_spec": "dp",
    "plan_noise": "dp",
    "planned_release": "dp",
    "sampling_plan": "dp",
    "DPRelease": "ledger",
    "LedgerEntry": "ledger",
    "LedgerError": "ledger",
    "LedgerSummary": "ledger",
    "PrivacyLedger": "ledger",
    "SpendDecision": "ledger",
    "compose_epsilon": "ledger",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
