"""CKKS-encrypted aggregation with TenSEAL: keys, packing codec, wire format (docs/DESIGN.md §4-§5).

Sites encrypt their example-weighted, quantised, packed update under one shared CKKS key (seeded
symmetric encryption with its secret key: half the bytes up); the coordinator validates and
*adds* ciphertexts with the public context only, and the sites decrypt the sum. Modules:

* :mod:`.keys`      key files, fingerprints, refusing a secret key at the coordinator
* :mod:`.params`    secure parameters (N = 4096, [60, 49]) and the noise model behind exactness
* :mod:`.layout`    the fixed order a state dict is flattened in, and its hash
* :mod:`.packing`   quantisation and packing settings with headroom, and the packing of an
                    experiment's ``[he]`` settings (:func:`packing_for`, :func:`check_packing`)
* :mod:`.quantise`  stochastic rounding, and packing fields (and spill chunks) into slot integers
* :mod:`.integrity` the checksum inside every update, and checking an aggregate's
* :mod:`.codec`     a site's update to slot values and blocks, and an aggregate back to the mean
* :mod:`.parallel`  encryption/decryption in worker processes (TenSEAL holds the GIL)
* :mod:`.seeded`    seeded symmetric encryption at the sites (SEAL via ``tenseal.sealapi``)
* :mod:`.meta`      the metadata ConfigRecord (format version, fingerprint, layout, packing)
* :mod:`.framing`   ciphertexts framed into raw-bytes Arrays of an ArrayRecord
* :mod:`.validate`  what the coordinator checks of a reply (public context only)
* :mod:`.sum`       the coordinator's block-wise ciphertext sum
* :mod:`.storage`   an aggregate as one file (an encrypted model version)
* :mod:`.wire`      the face of the wire format: encrypting an update, decoding an aggregate
* :mod:`.culprit`   which site corrupted an aggregate: group testing over groups of >= m sites
* :mod:`.groups`    group sums for that search, formed at the coordinator, checked at a site
* the ``[he]`` experiment settings are ``fedcl.config.experiment.HESpec`` (syntax and ranges
  only; ``fedcl.config`` imports no other fedcl package)

Names are imported lazily (PEP 562), as in ``fedcl.privacy`` above, so a spawned worker that
imports ``._worker`` pulls in only numpy and TenSEAL: not torch, Flower or pydantic.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "AggregateError": "errors",
    "AggregateIntegrityError": "errors",
    "GroupTooSmall": "errors",
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
    "Layout": "layout",
    "Packing": "packing",
    "check_packing": "packing",
    "packing_for": "packing",
    "META_KEY": "meta",
    "WireMeta": "meta",
    "ExpectedReply": "validate",
    "EncryptedSum": "sum",
    "aggregate_from_bytes": "storage",
    "aggregate_to_bytes": "storage",
    "decode_aggregate": "wire",
    "encrypt_update": "wire",
    "checksum_key": "integrity",
    "CulpritSearch": "culprit",
    "find_culprits": "culprit",
    "verifier_for": "culprit",
    "Recovery": "groups",
    "group_sum": "groups",
    "recover_aggregate": "groups",
    "verify_group_sum": "groups",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
