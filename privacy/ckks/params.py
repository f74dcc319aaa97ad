"""CKKS encryption parameters: what is secure, and how much exact integer room they leave.

Security: SEAL's default (``sec_level_type.tc128``) accepts a polynomial modulus degree N only
with a total coefficient modulus of at most the bits in :data:`SEAL_MAX_COEFF_BITS_128` (the
HomomorphicEncryption.org standard, classical 128-bit security, ternary secret). The default
here is N = 4096 with primes [60, 49] = 109 bits, exactly SEAL's limit for N = 4096.

Why these numbers: updates are only *added* at the coordinator, never multiplied, so a
ciphertext needs one data level (one 60-bit prime) and nothing to rescale; the 49-bit prime is
SEAL's special (key-switching) prime and is never part of a ciphertext. A fresh ciphertext is
then 2 polynomials × N coefficients × 8 bytes = 64 KiB for N/2 = 2048 slots.

Exact integers: values are encoded as integers V times a scale 2^s. Decryption is exact after
rounding as long as (a) V·2^s stays below q/2 (q = the data modulus), and (b) the encryption
noise, divided by 2^s, stays far below 0.5. :func:`min_scale_bits` is the noise model (measured;
see :data:`NOISE_STD_AT_4096_SCALE18`) and :func:`max_scale_bits` the room left by q.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

from .errors import CKKSConfigError

#: SEAL's ``CoeffModulus::MaxBitCount(N, tc128)``: largest secure total coefficient modulus.
SEAL_MAX_COEFF_BITS_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}

#: SEAL refuses primes above 60 bits.
MAX_PRIME_BITS = 60

#: Noise model of a *public-key* (asymmetric) fresh CKKS encryption in TenSEAL 0.3.18, measured on
#: 122,880 slots: standard deviation of the decrypted error is 0.0026 at N = 4096 and scale 2^18
#: (0.0053 at N = 8192: it grows linearly with N) and grows with sqrt(K) when K ciphertexts are
#: summed. Tails are heavier than Gaussian (Laplace-like: 99.99 % quantile at 6.4 sigma), so the
#: scale is chosen to keep 0.5 at >= 28 sigma: P(|error| >= 0.5) < e^-39 per value.
NOISE_STD_AT_4096_SCALE18 = 0.0026
NOISE_SIGMAS_TO_HALF = 28.0

#: Largest integer a float64 holds exactly: TenSEAL encodes and decodes through doubles.
MAX_EXACT_FLOAT_BITS = 52

#: A larger scale buys nothing once the noise is negligible; keep slack in q.
MAX_SCALE_BITS = 40


@dataclass(frozen=True)
class CKKSParams:
    """TenSEAL CKKS context parameters (what ``fedcl keys init`` is given)."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes)
        )
        self.check()

    def check(self) -> None:
        """Refuse parameters SEAL would call insecure or that leave no data level."""
        n = self.poly_modulus_degree
        if n not in SEAL_MAX_COEFF_BITS_128:
            raise CKKSConfigError(
                f"poly_modulus_degree = {n} is not supported: use one of "
                f"{sorted(SEAL_MAX_COEFF_BITS_128)} (4096 is enough for additions)"
            )
        sizes = self.coeff_mod_bit_sizes
        if len(sizes) < 2:
            raise CKKSConfigError(
                f"coeff_mod_bit_sizes = {list(sizes)} needs at least two primes: the data prime(s) "
                "and SEAL's special prime (last), e.g. [60, 49]"
            )
        if any(b < 20 or b > MAX_PRIME_BITS for b in sizes):
            raise CKKSConfigError(
                f"coeff_mod_bit_sizes = {list(sizes)}: every prime must have "
                f"20..{MAX_PRIME_BITS} bits"
            )
        limit = SEAL_MAX_COEFF_BITS_128[n]
        if sum(sizes) > limit:
            raise CKKSConfigError(
                f"coeff_mod_bit_sizes = {list(sizes)} total {sum(sizes)} bits, but N = {n} is "
                f"128-bit secure only up to {limit} bits (SEAL tc128); use fewer or smaller primes "
                "or a larger poly_modulus_degree"
            )

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2): one block of the wire format."""
        return self.poly_modulus_degree // 2

    @property
    def block_values(self) -> int:
        """Slot integers per ciphertext: two per CKKS slot, real and imaginary part (N; wire
        format 4, :mod:`.complex_slots`)."""
        return 2 * self.slots

    @property
    def data_bits(self) -> int:
        """Bits of the data modulus q of a fresh ciphertext (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def data_primes(self) -> int:
        return len(self.coeff_mod_bit_sizes) - 1

    def describe(self) -> str:
        return f"N={self.poly_modulus_degree} coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)}"


_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def params_of(ctx) -> CKKSParams:
    """The parameters of a loaded TenSEAL context (read from SEAL, not trusted from a file name).

    Read once per context object (a context's parameters never change; every encode and decode
    asked three times).
    """
    try:
        return _PARAMS[ctx]
    except (KeyError, TypeError):
        pass
    import tenseal.sealapi  # noqa: F401 - registers seal::Modulus so coeff_modulus() converts

    parms = ctx.seal_context().data.key_context_data().parms()
    params = CKKSParams(
        poly_modulus_degree=int(parms.poly_modulus_degree()),
        coeff_mod_bit_sizes=tuple(int(m.bit_count()) for m in parms.coeff_modulus()),
    )
    with contextlib.suppress(TypeError):  # not weakly referenceable: just do not cache
        _PARAMS[ctx] = params
    return params


def min_scale_bits(params: CKKSParams, num_ciphertexts: int) -> int:
    """Smallest scale exponent at which a sum of ``num_ciphertexts`` decrypts to exact integers."""
    sigma_at_scale_1 = (
        NOISE_STD_AT_4096_SCALE18
        * 2**18
        * (params.poly_modulus_degree / 4096)
        * math.sqrt(num_ciphertexts)
    )
    return math.ceil(math.log2(sigma_at_scale_1 * NOISE_SIGMAS_TO_HALF / 0.5))


def max_scale_bits(params: CKKSParams, slot_bits: int) -> int:
    """Largest scale exponent that keeps integers below 2^slot_bits under q/2 (one bit spare)."""
    return min(params.data_bits - 2 - slot_bits, MAX_SCALE_BITS)
