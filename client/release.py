"""A site releases a model: decrypt a stored encrypted model version with the site's secret key.

The coordinator holds no CKKS secret key (docs/DESIGN.md §4), so an encrypted production model
cannot be taken into use until a site administrator decides to release it: ``fedcl site release``
reads the version's stored ciphertext, decrypts it here with the site's secret context (the same
codec the site trains with) and returns the plaintext weights, which the command writes to the
registry as a ``release`` version (audited, downloadable as safetensors). Nothing about the
site's own data is released: the aggregate is the federation's model, which every site holds.
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict
from safetensors.torch import save as save_safetensors

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig
from fedcl.config import protocol as P

from .codec import CKKSCodec


def decrypt_model_version(
    payload: bytes, experiment: ExperimentConfig, site: SiteConfig
) -> dict[str, torch.Tensor]:
    """The plaintext model behind a stored encrypted model version (``payload``: its bytes)."""
    from fedcl.continual.plan import RunPlan
    from fedcl.privacy.ckks.storage import aggregate_from_bytes

    if not experiment.he.enabled:
        raise ConfigError(
            f"the run's experiment does not encrypt (he.enabled = false): site {site.site_id} "
            "has nothing to decrypt; a plaintext version downloads as it is"
        )
    try:
        arrays, meta = aggregate_from_bytes(payload)
    except ValueError as exc:
        raise ConfigError(f"not an encrypted model version: {exc}") from None
    like = RunPlan.of(experiment).initial_model().state_dict()
    content = RecordDict({P.ARRAYS: arrays, P.meta_key(P.ARRAYS): meta})
    return CKKSCodec(experiment, site).decode(content, P.ARRAYS, like)


def release_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of a released model (no pickle)."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
