"""The metadata ``ConfigRecord`` of an encrypted reply or aggregate, and its keys.

It carries the format version (:data:`FORMAT_VERSION`), kind (update/aggregate), the context
fingerprint, the layout hash, the number of values and blocks, the packing parameters and the
scale, the SHA-256 of the model the update was computed from, and for an aggregate the number of
updates summed. It never carries an example count: those are only in ciphertext.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from .packing import Packing

#: 4: two slot integers per CKKS slot, real and imaginary part (:mod:`.complex_slots`), so a
#: block holds N of them (``ckks-slots``); a version-2 or -3 record's blocks hold N/2, in the
#: real parts, and are still read (stored aggregates), never summed with version-4 updates.
#: 3: the packing may have a spill field (``ckks-spill-bits``; :mod:`.packing`). 2: every update
#: carries its checksum fields after its values (:mod:`.integrity`); a version-2 record is read
#: as spill 0 (the same slot layout), so aggregates stored by it still load. Version 1 (no
#: checksum) is refused, not read: its slots have another layout, and an aggregate without a
#: checksum cannot be told from a corrupt one.
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
META_KEY = "ckks"  # RecordDict key of the metadata ConfigRecord
KIND_UPDATE = "update"
KIND_AGGREGATE = "aggregate"

# Keys of the metadata ConfigRecord.
FORMAT = "ckks-format"
KIND = "ckks-kind"
FINGERPRINT = "ckks-fingerprint"
LAYOUT = "ckks-layout"
VALUES = "ckks-values"
BLOCKS = "ckks-blocks"
SLOTS = "ckks-slots"
BITS = "ckks-bits"
VALUES_PER_SLOT = "ckks-values-per-slot"
MAX_SITES = "ckks-max-sites"
CLIP = "ckks-clip"
MAX_EXAMPLES = "ckks-max-examples"
SCALE_BITS = "ckks-scale-bits"
BASE = "ckks-base"
SUMMED = "ckks-summed"
PER_ARRAY = "ckks-blocks-per-array"
SPILL_BITS = "ckks-spill-bits"


@dataclass(frozen=True)
class WireMeta:
    """The metadata ConfigRecord, parsed."""

    kind: str
    fingerprint: str
    layout_hash: str
    num_values: int
    num_blocks: int
    slots: int
    packing: Packing
    scale_bits: int
    per_array: int = 1
    base_sha256: str = ""
    summed: int = 0

    def to_record(self) -> ConfigRecord:
        p = self.packing
        rec: dict[str, Any] = {
            FORMAT: FORMAT_VERSION,
            KIND: self.kind,
            FINGERPRINT: self.fingerprint,
            LAYOUT: self.layout_hash,
            VALUES: self.num_values,
            BLOCKS: self.num_blocks,
            PER_ARRAY: self.per_array,
            SLOTS: self.slots,
            BITS: p.bits,
            VALUES_PER_SLOT: p.values_per_slot,
            MAX_SITES: p.max_sites,
            CLIP: float(p.clip),
            MAX_EXAMPLES: p.max_examples,
            SPILL_BITS: p.spill_bits,
            SCALE_BITS: self.scale_bits,
            BASE: self.base_sha256,
        }
        if self.kind == KIND_AGGREGATE:
            rec[SUMMED] = self.summed
        return ConfigRecord(rec)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.to_record())

    @classmethod
    def from_record(cls, rec: Mapping[str, Any] | None) -> WireMeta:
        """Parse; a ``ValueError`` names the missing or malformed key."""
        if rec is None:
            raise ValueError(
                f"no '{META_KEY}' metadata record (a plaintext reply in an encrypted round?)"
            )
        try:
            version = int(rec[FORMAT])
            if version == 1:
                raise ValueError(
                    "wire format version 1 (written by a fedcl without the aggregate checksum) "
                    f"is not read by this one, which writes and reads version {FORMAT_VERSION}: "
                    "run the same fedcl at every site and the coordinator, and start an "
                    "encrypted run stored by the old one afresh"
                )
            if version not in READABLE_VERSIONS:
                raise ValueError(
                    f"wire format version {version}, expected one of {list(READABLE_VERSIONS)}"
                )
            kind = str(rec[KIND])
            if kind not in (KIND_UPDATE, KIND_AGGREGATE):
                raise ValueError(f"unknown kind {kind!r}")
            packing = Packing(
                bits=int(rec[BITS]),
                values_per_slot=int(rec[VALUES_PER_SLOT]),
                max_sites=int(rec[MAX_SITES]),
                clip=float(rec[CLIP]),
                max_examples=int(rec[MAX_EXAMPLES]),
                spill_bits=int(rec[SPILL_BITS]) if version >= 3 else 0,
            )
            return cls(
                kind=kind,
                fingerprint=str(rec[FINGERPRINT]),
                layout_hash=str(rec[LAYOUT]),
                num_values=int(rec[VALUES]),
                num_blocks=int(rec[BLOCKS]),
                per_array=int(rec[PER_ARRAY]),
                slots=int(rec[SLOTS]),
                packing=packing,
                scale_bits=int(rec[SCALE_BITS]),
                base_sha256=str(rec.get(BASE, "") or ""),
                summed=int(rec.get(SUMMED, 0) or 0),
            )
        except KeyError as exc:
            raise ValueError(f"metadata lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed metadata: {exc}") from None
