"""The site's half of encrypted aggregation: decrypt what arrives, encrypt what leaves.

Sites hold the secret context (``key_path`` in ``site.toml``); the coordinator never does. A
site encrypts its example-weighted *weights*, so every aggregate decrypts to a whole model and a
site that missed rounds is current again after one message.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig
from fedcl.config import protocol as P


def meta_key(record_key: str) -> str:
    """Where the CKKS metadata of an encrypted record travels (``ckks`` for the model)."""
    return P.HE_META if record_key == P.ARRAYS else f"{P.HE_META}:{record_key}"


@lru_cache(maxsize=4)
def _secret_context(path: str, mtime: float, fingerprint: str | None):
    from fedcl.privacy.ckks.keys import load_secret_context

    return load_secret_context(path, expected_fingerprint=fingerprint)


class SiteCrypto:
    """Encrypts and decrypts under this site's secret context."""

    def __init__(self, experiment: ExperimentConfig, site: SiteConfig):
        self.he = experiment.he
        if site.key_path is None:
            raise ConfigError(
                f"site {site.site_id}: the experiment encrypts updates (he.enabled) but site.toml "
                "has no key_path; set key_path = '/etc/fedcl/keys/secret.ctx' (from `fedcl keys "
                "init`, copied to the site out of band)"
            )
        path = Path(site.key_path)
        if not path.is_file():
            raise ConfigError(f"site {site.site_id}: key_path {path} does not exist")
        self.ctx = _secret_context(str(path), path.stat().st_mtime, self.he.fingerprint)

    def decrypt(
        self,
        record: ArrayRecord,
        meta: ConfigRecord,
        like: dict[str, torch.Tensor],
        *,
        fisher=False,
    ) -> dict[str, torch.Tensor]:
        """The weighted mean a ciphertext aggregate holds, shaped and typed like ``like``."""
        from fedcl.privacy.ckks.codec import Layout
        from fedcl.privacy.ckks.wire import decode_aggregate

        mean, _total, _sites = decode_aggregate(
            record,
            meta,
            self.ctx,
            layout=Layout.from_state_dict(like),
            packing=self.he.packing(fisher=fisher),
        )
        return {
            k: torch.from_numpy(np.asarray(mean[k])).to(like[k].dtype).reshape(like[k].shape)
            for k in like
        }

    def encrypt(
        self, state: dict[str, torch.Tensor], num_examples: int, base_sha256: str, *, fisher=False
    ) -> tuple[ArrayRecord, ConfigRecord, dict[str, float]]:
        """(ciphertext blocks, metadata, site-only stats) of ``num_examples``·``state``."""
        from fedcl.privacy.ckks.codec import Layout
        from fedcl.privacy.ckks.wire import encrypt_update

        enc = encrypt_update(
            state,
            num_examples,
            self.ctx,
            self.he.packing(fisher=fisher),
            layout=Layout.from_state_dict(state),
            base_sha256=base_sha256,
        )
        return enc.arrays, enc.meta, {k: float(v) for k, v in enc.stats.metrics().items()}
