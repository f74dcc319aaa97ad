"""CKKS-encrypted aggregation with TenSEAL: keys, packing codec, wire format (DESIGN.md §4-§5).

Sites encrypt their example-weighted, quantised, packed update under one shared CKKS key; the
coordinator validates and *adds* ciphertexts with the public context only, and the sites decrypt
the sum. Modules:

* :mod:`.keys`     key files, fingerprints, refusing a secret key at the coordinator
* :mod:`.params`   secure parameters (N = 4096, [60, 49]) and the noise model behind exactness
* :mod:`.codec`    layout, stochastic quantisation, packing with headroom, and the packing of
                   an experiment's ``[he]`` settings (:func:`packing_for`, :func:`check_packing`)
* :mod:`.parallel` encryption/decryption in worker processes (TenSEAL holds the GIL)
* :mod:`.wire`     ArrayRecord/ConfigRecord format, reply validation, block-wise sums, decoding
* the ``[he]`` experiment settings are ``fedcl.config.experiment.HESpec`` (syntax and ranges
  only; ``fedcl.config`` imports no other fedcl package)

Names are imported lazily (PEP 562), as in ``fedcl.privacy`` above, so a spawned worker that
imports ``._worker`` pulls in only numpy and TenSEAL: not torch, Flower or pydantic.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AggregateError": "errors",
    "CKKSConfigError": "errors",
    "CKKSError": "errors",
    "CKKSKeyError": "errors",
    "ReplyRejected": "errors",
    "UpdateError": "errors",
    "CKKSParams": "params",
    "KeyFiles": "keys",
    "describe_key_file": "keys",
    "fingerprint": "keys",
    "init_keys": "keys",
    "load_public_context": "keys",
    "load_secret_context": "keys",
    "Layout": "codec",
    "Packing": "codec",
    "check_packing": "codec",
    "packing_for": "codec",
    "EncryptedSum": "wire",
    "ExpectedReply": "wire",
    "META_KEY": "wire",
    "WireMeta": "wire",
    "aggregate_from_bytes": "wire",
    "aggregate_to_bytes": "wire",
    "decode_aggregate": "wire",
    "encrypt_update": "wire",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
