"""A checksum inside each site's ciphertext, so a site can tell a corrupt aggregate (issue 11).

Why: the coordinator can only check that a reply *looks* like a ciphertext (:mod:`.validate`).
One bit flipped in the middle of a ciphertext still deserializes, has the right shape and is
added into the sum; every site then fails to decrypt the aggregate and nothing says why. Slots
that are not integers after decryption already reveal garbage; a checksum also catches damage
that decrypts to clean integers (a flipped bit in a site's slot vector before encryption, one
block of an update added twice), and says plainly that the *aggregate is corrupt*.

What is in the slots
--------------------
After a site's ``n`` quantised values q_j (unsigned, offset included) the codec packs
``c = Packing.checksum_fields`` more fields (5 at the default 15 bits; 9 at 8 bits), then zero
padding. Checksum field i holds

    c_i = (b_i0 · h_0 + b_i1 · h_1 + Σ_j a_ij · q_j) mod M_i

where h_0 = 1 and h_1 = the capped example count are the header slots, M_i are distinct primes
below 2^bits (:func:`~.packing.checksum_moduli`: 32749, 32719, 32717, 32713, 32707 at 15 bits,
75 bits together) and the coefficients a_ij, b_ij ∈ [1, M_i - 1] are drawn from Philox keyed by
:func:`checksum_key` (derived from the federation's secret key: only sites can compute them).

Why sums stay exact: c_i < M_i < 2^bits, the same range as a quantised value, so the headroom
that keeps the sum of ``max_sites`` values below 2^field_bits keeps the sum of checksums exact
too (the sum never carries into a neighbour field, and the scale keeps CKKS noise below 0.5).
The checksum is linear, so for K summed sites with field sums Q_j = Σ q_j, header sums K and
N = Σ n_k, and checksum sums C_i = Σ c_i (all exact integers after decryption):

    C_i ≡ b_i0 · K + b_i1 · N + Σ_j a_ij · Q_j   (mod M_i)

which :func:`verify` checks (and that the padding fields are zero), raising
:class:`AggregateIntegrityError`. Cost: c fields, i.e. 3 slots at the default packing, of 8,615
for a 17k-parameter model: no extra ciphertext block in practice.

What it detects: an error in one value field or header slot always (a multiple of every M_i
would need more bits than a field has); damage spread over many fields (any corrupt
ciphertext) unless it happens to fit every checksum, a chance of about Π 1/M_i ≈ 2^-75 at 15
bits. The coordinator learns nothing new: the checksum is inside the ciphertext and only sites
hold the key.

What it does not: a *malicious* site holds the shared key and can encrypt wrong values with a
consistent checksum. A malicious coordinator cannot forge one without the key (an added
ciphertext of its own passes with the same ~2^-75 chance), but it can add whole valid replies
more than once: a linear checksum stays consistent, and only the decrypted contributor count,
which sites compare with the metadata's, shows it, unless the coordinator lies there too. See
:mod:`.culprit` for finding the damaged site.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref

import numpy as np

from .errors import AggregateIntegrityError, CKKSKeyError
from .packing import Packing

#: Derivation label of the checksum key; a new scheme gets a new label (and wire format).
KEY_LABEL = b"fedcl-ckks-checksum-1\x00"
#: Coefficients are drawn and applied this many values at a time (bounded memory; exact sums:
#: 2^16 products below 2^40 each stay far below 2^63).
CHUNK = 1 << 16
#: The key of :func:`slot_vector`/:func:`decode_slots` callers that pass none (tests, probes).
UNKEYED = b""

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checksum_key(ctx) -> bytes:
    """32 bytes derived from a *secret* context: SHA-256 of a label and the secret key file.

    Every site of a federation holds the same secret context, so all derive the same key; the
    coordinator's public context has no secret key and cannot.
    """
    try:
        return _KEYS[ctx]
    except (KeyError, TypeError):
        pass
    from .keys import secret_bytes

    if not ctx.is_private():
        raise CKKSKeyError(
            "the checksum inside every update is keyed by the CKKS secret key: encrypt and "
            "decrypt updates with the site's secret.ctx, not the public context"
        )
    key = hashlib.sha256(KEY_LABEL + secret_bytes(ctx)).digest()
    with contextlib.suppress(TypeError):
        _KEYS[ctx] = key
    return key


def _stream(key: bytes, index: int) -> np.random.Philox:
    """The coefficient stream of checksum ``index``: Philox4x64 keyed by H(key, index).

    A bit generator's raw output is fixed by its algorithm and key (NumPy keeps bit-generator
    streams stable across versions), so sites on different NumPy releases agree.
    """
    sub = hashlib.sha256(key + index.to_bytes(4, "little")).digest()[:16]
    return np.random.Philox(key=int.from_bytes(sub, "little"))


def _coefficients(gen: np.random.Philox, count: int, modulus: int) -> np.ndarray:
    """``count`` coefficients in [1, modulus - 1] (never 0, so no field escapes a checksum).

    Each 64-bit draw gives two 32-bit words x, mapped to 1 + floor(x·(M-1) / 2^32) (Lemire's
    multiply-shift: exact in uint64 as M < 2^20, and about twice as fast as ``%``).
    """
    raw = gen.random_raw(-(-count // 2))
    words = np.empty(2 * raw.shape[0], dtype=np.uint64)
    words[0::2] = raw & np.uint64(0xFFFFFFFF)
    words[1::2] = raw >> np.uint64(32)
    words = words[:count]
    words *= np.uint64(modulus - 1)
    words >>= np.uint64(32)
    return words.astype(np.int64) + 1


#: Coefficient streams of at most this many values (all moduli together) are kept per process:
#: every round checksums the same layout under the same key, and drawing them is most of the
#: checksum's cost (~0.6 ms of ~0.7 for a 17k-parameter model). 2^21 int64 = 16 MiB at most
#: per entry; larger models draw them afresh (their encryption dwarfs it).
COEFFICIENT_CACHE_VALUES = 1 << 21
_COEFFICIENTS: dict[tuple[bytes, tuple[int, ...], int], list] = {}
_COEFFICIENTS_MAX_ENTRIES = 4


def _draw(key: bytes, index: int, modulus: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(b, [a per CHUNK of values]) of checksum ``index``: the stream's order, as drawn."""
    gen = _stream(key, index)
    b = _coefficients(gen, 2, modulus)
    chunks = [_coefficients(gen, min(CHUNK, n - start), modulus) for start in range(0, n, CHUNK)]
    return b, chunks


def _all_coefficients(key: bytes, moduli: tuple[int, ...], n: int) -> list:
    """Every checksum's coefficients for ``n`` fields, cached when small (see above)."""
    cacheable = n * len(moduli) <= COEFFICIENT_CACHE_VALUES
    tag = (key, moduli, n)
    if cacheable and tag in _COEFFICIENTS:
        return _COEFFICIENTS[tag]
    out = [_draw(key, i, m, n) for i, m in enumerate(moduli)]
    if cacheable:
        while len(_COEFFICIENTS) >= _COEFFICIENTS_MAX_ENTRIES:
            _COEFFICIENTS.pop(next(iter(_COEFFICIENTS)))
        _COEFFICIENTS[tag] = out
    return out


#: Fields below 2^this are multiplied unreduced: a coefficient (< 2^20) times a field, summed
#: over a CHUNK (2^16) of them, stays below 2^62 in int64.
UNREDUCED_FIELD_BITS = 26
_MATRICES: dict[tuple[bytes, tuple[int, ...], int], list[np.ndarray]] = {}


def _matrices(key: bytes, moduli: tuple[int, ...], n: int) -> list[np.ndarray]:
    """Every checksum's coefficients of each CHUNK of fields as one (moduli × chunk) matrix:
    the cached streams of :func:`_all_coefficients`, stacked once per key and layout."""
    tag = (key, moduli, n)
    hit = _MATRICES.get(tag)
    if hit is None:
        per = _all_coefficients(key, moduli, n)
        hit = [np.stack([chunks[j] for _, chunks in per]) for j in range(len(per[0][1]))]
        while len(_MATRICES) >= _COEFFICIENTS_MAX_ENTRIES:
            _MATRICES.pop(next(iter(_MATRICES)))
        _MATRICES[tag] = hit
    return hit


def checksums(
    fields: np.ndarray, header: tuple[int, int], moduli: tuple[int, ...], key: bytes = UNKEYED
) -> np.ndarray:
    """(b_i0·h_0 + b_i1·h_1 + Σ_j a_ij·fields_j) mod M_i for every modulus: int64, one per M_i.

    ``fields`` are non-negative integers (one site's quantised values, or their sums). Small
    fields of a cached layout (every round's) take one matrix product per CHUNK for all moduli
    (the same sums: the products are exact, reduced once at the end); others are reduced per
    modulus first.
    """
    n = fields.shape[0]
    moduli = tuple(moduli)
    if (
        n
        and n * len(moduli) <= COEFFICIENT_CACHE_VALUES
        and int(fields.min()) >= 0
        and int(fields.max()) < 1 << UNREDUCED_FIELD_BITS
    ):
        m = np.asarray(moduli, dtype=np.int64)
        acc = np.zeros(len(moduli), dtype=np.int64)
        for start, a in zip(range(0, n, CHUNK), _matrices(key, moduli, n), strict=True):
            acc += (a @ fields[start : start + CHUNK].astype(np.int64, copy=False)) % m
        b = np.stack([b for b, _ in _all_coefficients(key, moduli, n)])
        h0, h1 = (int(h) for h in header)
        head = (b[:, 0] * (h0 % m) + b[:, 1] * (h1 % m)) % m
        return (acc + head) % m
    out = np.empty(len(moduli), dtype=np.int64)
    for i, (modulus, (b, chunks)) in enumerate(
        zip(moduli, _all_coefficients(key, tuple(moduli), n), strict=True)
    ):
        h0, h1 = (int(h) % modulus for h in header)
        acc = (int(b[0]) * h0 + int(b[1]) * h1) % modulus
        for start, a in zip(range(0, n, CHUNK), chunks, strict=True):
            x = fields[start : start + CHUNK] % modulus
            acc = (acc + int(np.dot(a, x))) % modulus
        out[i] = acc
    return out


def verify(
    fields: np.ndarray,
    num_values: int,
    header: tuple[int, int],
    packing: Packing,
    key: bytes = UNKEYED,
) -> None:
    """Check a decrypted aggregate's fields: values, then checksums, then zero padding.

    ``fields`` are every unpacked field of the payload slots (the summed, unsigned values before
    the offset is taken off), ``header`` the summed header slots (contributors, example count).
    Raises :class:`AggregateIntegrityError` saying the aggregate is corrupt.
    """
    moduli = packing.checksum_moduli
    values = fields[:num_values]
    sums = fields[num_values : num_values + len(moduli)]
    padding = fields[num_values + len(moduli) :]
    if sums.shape[0] != len(moduli):
        raise AggregateIntegrityError(
            f"the aggregate is corrupt: it has no room for its {len(moduli)} checksum fields"
        )
    want = checksums(values, header, moduli, key)
    got = sums % np.asarray(moduli, dtype=np.int64)
    bad = int(np.count_nonzero(got != want))
    if bad:
        raise AggregateIntegrityError(
            f"the aggregate is corrupt: {bad} of its {len(moduli)} checksums do not match its "
            f"values (summed over {int(header[0])} site(s)): an update was damaged after its "
            "site checksummed it (in memory, on the wire or at the coordinator); find which "
            "with a culprit search over groups of sites (fedcl.privacy.ckks.culprit)"
        )
    if np.any(padding):
        raise AggregateIntegrityError(
            "the aggregate is corrupt: its padding fields after the checksums are not zero"
        )
