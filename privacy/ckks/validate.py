"""What the coordinator checks of a site's reply before adding it, from the public context alone.

:class:`ExpectedReply` says what a valid reply looks like this round (fingerprint, layout,
packing, scale, block sizes, the round's model); :func:`check_meta` checks the metadata cheaply,
before any ciphertext is touched, and :func:`load_reply` deserializes and checks every block
under the *public* context. Each refusal is a :class:`ReplyRejected` whose reason the audit log
records.

What this cannot see: a ciphertext that deserializes and has the right shape but whose bytes
were corrupted (one bit flipped in a coefficient) is a valid-looking ciphertext of garbage. Only
decryption tells, at the sites (:mod:`.integrity`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ArrayRecord

from .complex_slots import complex_size
from .errors import ReplyRejected
from .framing import blocks_per_array, record_blocks
from .keys import fingerprint, short
from .layout import Layout
from .meta import KIND_UPDATE, WireMeta
from .packing import Packing
from .params import CKKSParams, params_of

#: Serialized ciphertexts of one parameter set differ by a byte or two (protobuf varints).
BLOCK_BYTES_TOLERANCE = 64


@dataclass(frozen=True)
class ExpectedReply:
    """What a valid reply looks like this round, derived from the public context alone."""

    ctx: Any  # the public TenSEAL context
    fingerprint: str
    layout_hash: str
    num_values: int
    packing: Packing
    params: CKKSParams
    scale_bits: int
    block_bytes: int
    base_sha256: str | None = None
    #: Bytes of a seeded (symmetric) fresh block (:mod:`.seeded`), 0 if they cannot be made.
    seeded_block_bytes: int = 0

    @classmethod
    def build(
        cls, public_ctx, packing: Packing, layout: Layout, *, base_sha256: str | None = None
    ) -> ExpectedReply:
        import tenseal as ts

        params = params_of(public_ctx)
        scale_bits = packing.scale_bits(params)  # CKKSConfigError now, not at the first reply
        probe = ts.ckks_vector(public_ctx, [0.0], scale=float(2**scale_bits)).serialize()
        try:
            from .seeded import seeded_block_bytes

            seeded = seeded_block_bytes(public_ctx, float(2**scale_bits))
        except Exception:  # a TenSEAL build without sealapi: sites encrypt with the public key
            seeded = 0
        return cls(
            ctx=public_ctx,
            fingerprint=fingerprint(public_ctx),
            layout_hash=layout.hash,
            num_values=layout.num_values,
            packing=packing,
            params=params,
            scale_bits=scale_bits,
            block_bytes=len(probe),
            base_sha256=base_sha256,
            seeded_block_bytes=seeded,
        )

    def with_base(self, base_sha256: str | None) -> ExpectedReply:
        return replace(self, base_sha256=base_sha256)

    @property
    def block_lengths(self) -> list[int]:
        return self.packing.block_lengths(self.num_values, self.params)

    @property
    def num_blocks(self) -> int:
        return self.packing.num_blocks(self.num_values, self.params)

    @property
    def per_array(self) -> int:
        return blocks_per_array(self.params)


def check_meta(meta: Mapping[str, Any] | None, expected: ExpectedReply) -> WireMeta:
    """Parse and check a reply's metadata (cheap: run it before touching any ciphertext)."""
    try:
        m = WireMeta.from_record(meta)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    if m.kind != KIND_UPDATE:
        raise ReplyRejected(f"kind {m.kind!r}, expected {KIND_UPDATE!r}")
    if m.fingerprint != expected.fingerprint:
        raise ReplyRejected(
            f"context fingerprint {short(m.fingerprint)}… is not the federation's "
            f"{short(expected.fingerprint)}… (the site uses other keys)"
        )
    if m.layout_hash != expected.layout_hash or m.num_values != expected.num_values:
        raise ReplyRejected(
            f"layout {short(m.layout_hash)}… ({m.num_values} values) is not the model's "
            f"{short(expected.layout_hash)}… ({expected.num_values} values)"
        )
    if (
        m.packing != expected.packing
        or m.scale_bits != expected.scale_bits
        or m.slots != expected.params.block_values
    ):
        raise ReplyRejected(
            f"packing {m.packing} at scale 2^{m.scale_bits} differs from the experiment's "
            f"{expected.packing} at 2^{expected.scale_bits}"
        )
    if m.num_blocks != expected.num_blocks or m.per_array != expected.per_array:
        raise ReplyRejected(
            f"{m.num_blocks} blocks ({m.per_array} per array) announced, the layout needs "
            f"{expected.num_blocks} ({expected.per_array} per array)"
        )
    if expected.base_sha256 and m.base_sha256 != expected.base_sha256:
        raise ReplyRejected(
            f"trained from model {short(m.base_sha256) or '(unknown)'}…, but this round's model is "
            f"{short(expected.base_sha256)}…"
        )
    return m


def load_reply(
    arrays: ArrayRecord | None, meta: Mapping[str, Any] | None, expected: ExpectedReply
) -> tuple[list, bytes]:
    """Validate a reply completely; its ciphertexts (under the PUBLIC context) and first block.

    Raises :class:`ReplyRejected` with the reason to audit; the first block's bytes let
    :class:`EncryptedSum` refuse a replayed update.
    """
    import tenseal as ts

    check_meta(meta, expected)
    if arrays is None:
        raise ReplyRejected("no ciphertext blocks in the reply")
    try:
        blocks = record_blocks(arrays, expected.num_blocks, expected.per_array)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    lengths = [complex_size(n) for n in expected.block_lengths]  # CKKS slots: 2 integers each
    scale = float(2**expected.scale_bits)
    vectors = []
    for i, (data, length) in enumerate(zip(blocks, lengths, strict=True)):
        if not any(
            abs(len(data) - size) <= BLOCK_BYTES_TOLERANCE
            for size in (expected.block_bytes, expected.seeded_block_bytes)
            if size
        ):
            seeded = (
                f" ({expected.seeded_block_bytes} seeded)" if expected.seeded_block_bytes else ""
            )
            raise ReplyRejected(
                f"block {i} has {len(data)} bytes; ciphertexts of these parameters have "
                f"{expected.block_bytes}{seeded}"
            )
        try:
            vec = ts.ckks_vector_from(expected.ctx, data)
            cts = vec.ciphertext()
            ct = cts[0]
            shape_ok = (
                vec.size() == length
                and len(cts) == 1
                and ct.size() == 2
                and ct.poly_modulus_degree() == expected.params.poly_modulus_degree
                and ct.coeff_modulus_size() == expected.params.data_primes
                and ct.is_ntt_form()
                and not ct.is_transparent()  # an "encryption" that encrypts nothing
                and ct.scale == scale
            )
        except Exception as exc:  # TenSEAL/SEAL raise ValueError or RuntimeError on bad bytes
            raise ReplyRejected(
                f"block {i} does not deserialize under the public context: {exc}"
            ) from None
        if not shape_ok:
            raise ReplyRejected(
                f"block {i} is not a fresh {length}-slot ciphertext at scale "
                f"2^{expected.scale_bits} under the federation's parameters"
            )
        vectors.append(vec)
    return vectors, blocks[0]
