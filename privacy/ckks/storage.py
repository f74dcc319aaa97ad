"""Storage of an encrypted model version (format ``ckks``): one file, metadata and blocks.

The registry stores an aggregate as it travels: the magic, a JSON header (the metadata record
and the block sizes), then the serialized ciphertexts. Reading refuses a truncated or padded
payload and parses the metadata like a message's (so an unknown format version is refused).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from .framing import blocks_to_record, record_blocks
from .meta import WireMeta

MAGIC = b"FEDCL-CKKS\x00\x01"


def aggregate_to_bytes(arrays: ArrayRecord, meta: Mapping[str, Any]) -> bytes:
    """One file for a model version: magic, JSON header (metadata, block sizes), blocks."""
    m = WireMeta.from_record(meta)
    blocks = record_blocks(arrays, m.num_blocks, m.per_array)
    header = json.dumps({"meta": m.to_dict(), "blocks": [len(b) for b in blocks]}).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blocks])


def aggregate_from_bytes(payload: bytes) -> tuple[ArrayRecord, ConfigRecord]:
    if not payload.startswith(MAGIC):
        raise ValueError("not a fedcl CKKS model version (bad magic)")
    pos = len(MAGIC)
    (size,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    header = json.loads(payload[pos : pos + size])
    pos += size
    blocks = []
    for n in header["blocks"]:
        blocks.append(payload[pos : pos + n])
        pos += n
    if pos != len(payload):
        raise ValueError("truncated or padded CKKS model version")
    meta = WireMeta.from_record(header["meta"])
    return blocks_to_record(blocks, meta.per_array), meta.to_record()
