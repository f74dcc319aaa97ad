"""How many bits each quantised value gets, and how values share a CKKS slot.

A :class:`Packing` fixes the quantisation (``bits``, ``clip``), the weight unit
(``max_examples``) and the packing: each field gets ``bits + headroom`` bits, headroom =
ceil(log2(max_sites)), so the sum of up to ``max_sites`` fields never carries into its
neighbour, and ``values_per_slot`` fields share one slot. Where the round is small enough that
a slot has bits to spare after them (5 sites: 2 × 18 bits of the 41 the noise leaves), a
narrower *spill* field of ``spill_bits`` data bits (plus headroom) sits above them, and whole
values are cut into ``spill_bits``-bit chunks across consecutive spill fields: sums of chunks
are as exact as sums of fields, and a value is put back together from its chunk sums (linear).
After the values come
:attr:`Packing.checksum_fields` checksum fields (:mod:`.integrity`), each below 2^bits like a
value, so the headroom keeps their sums exact too. :meth:`Packing.scale_bits` picks the
CKKS scale and refuses (:class:`CKKSConfigError`) a packing that could not sum ``max_sites``
ciphertexts exactly. :func:`packing_for` builds one from an experiment's ``[he]`` settings and
:func:`check_packing` refuses settings that cannot be exact, as a config error.

Imports only the standard library and ``fedcl.config``: config validation asks it without numpy,
torch or TenSEAL (tests/test_imports.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from fedcl.config.errors import ConfigError

from .errors import CKKSConfigError
from .params import MAX_EXACT_FLOAT_BITS, CKKSParams, max_scale_bits, min_scale_bits

if TYPE_CHECKING:
    from fedcl.config.experiment import HESpec

#: Slots at the start of block 0: contributor count, capped example count.
HEADER_SLOTS = 2
#: The checksum fields of one update hold at least this many bits of check together.
CHECKSUM_BITS = 64
#: Largest checksum modulus: coefficient × value products stay exact in int64 (see .integrity).
MAX_CHECKSUM_MODULUS_BITS = 20


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@cache
def checksum_moduli(bits: int) -> tuple[int, ...]:
    """The moduli of an update's checksum fields: primes below 2^min(bits, 20), largest first.

    As many as make Σ log2(M_i) >= :data:`CHECKSUM_BITS`; each M_i < 2^bits, so a checksum
    (< M_i) fits a field like a quantised value does. They are distinct primes when ``bits`` >= 8
    (repeated only when ``bits`` is too small to offer enough), so an error confined to one value
    field (or a header slot) goes unseen only if it is a multiple of every M_i: never, as their
    product exceeds 2^field_bits.
    """
    top = (1 << min(bits, MAX_CHECKSUM_MODULUS_BITS)) - 1
    primes = [n for n in range(top, max(1, top - 4096), -1) if _is_prime(n)]
    if len(primes) * math.log2(primes[-1]) < CHECKSUM_BITS:
        primes = [n for n in range(top, 1, -1) if _is_prime(n)]
    out: list[int] = []
    while sum(math.log2(m) for m in out) < CHECKSUM_BITS:
        out.append(primes[len(out) % len(primes)])
    return tuple(out)


@dataclass(frozen=True)
class Packing:
    """Quantisation and packing settings (what the codec needs of the experiment's HESpec)."""

    bits: int = 15
    values_per_slot: int = 2
    max_sites: int = 20
    clip: float = 0.5
    max_examples: int = 10_000
    #: Data bits of the spill field above the ``values_per_slot`` fields (0: none);
    #: :func:`spill_bits_for` picks it for a round, :func:`packing_for` sets it.
    spill_bits: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 32:
            raise CKKSConfigError(f"he.bits = {self.bits}: use 2..32 bits per value")
        if self.values_per_slot not in (1, 2, 3):
            raise CKKSConfigError(f"he.values_per_slot = {self.values_per_slot}: use 1, 2 or 3")
        if self.max_sites < 1:
            raise CKKSConfigError(f"he.max_sites = {self.max_sites}: must be at least 1")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise CKKSConfigError(f"he.clip = {self.clip}: must be a positive number")
        if self.max_examples < 1:
            raise CKKSConfigError(f"he.max_examples = {self.max_examples}: must be at least 1")
        if not 0 <= self.spill_bits <= self.bits:
            raise CKKSConfigError(
                f"spill_bits = {self.spill_bits}: use 0..{self.bits} (he.bits) data bits per slot"
            )

    @property
    def headroom_bits(self) -> int:
        """ceil(log2(max_sites)): room for the carry of summing every site's field."""
        return (self.max_sites - 1).bit_length()

    @property
    def field_bits(self) -> int:
        return self.bits + self.headroom_bits

    @property
    def spill_field_bits(self) -> int:
        """Width of the spill field: its data bits and the same headroom (0: no spill)."""
        return self.spill_bits + self.headroom_bits if self.spill_bits else 0

    @property
    def chunks_per_value(self) -> int:
        """Spill fields one value is cut into: ceil(bits / spill_bits) (0: no spill)."""
        return -(-self.bits // self.spill_bits) if self.spill_bits else 0

    @property
    def slot_bits(self) -> int:
        """Bits of a summed slot integer: the full fields and the spill field above them."""
        return self.values_per_slot * self.field_bits + self.spill_field_bits

    def capacity(self, payload_slots: int) -> int:
        """Fields ``payload_slots`` slots hold: ``values_per_slot`` each, then one whole value
        per ``chunks_per_value`` spill fields."""
        spill = payload_slots // self.chunks_per_value if self.spill_bits else 0
        return self.values_per_slot * payload_slots + spill

    def payload_slots(self, num_fields: int) -> int:
        """Fewest slots (after the header) whose fields hold ``num_fields`` fields."""
        m, c = self.values_per_slot, self.chunks_per_value
        if not c:
            return -(-num_fields // m)
        s = (num_fields * c) // (m * c + 1)  # a lower bound: capacity(s) <= s·(m + 1/c)
        while self.capacity(s) < num_fields:
            s += 1
        return s

    @property
    def values_per_slot_effective(self) -> float:
        """Values per slot counting the spill: m + 1/chunks_per_value (bytes scale with 1/it)."""
        return self.values_per_slot + (1 / self.chunks_per_value if self.spill_bits else 0.0)

    @property
    def offset(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def step(self) -> float:
        """Quantisation step of w·Δ: clip / (2^(bits-1) - 1)."""
        return self.clip / self.offset

    def error_bound(self, contributors: int, total_count: int) -> float:
        """Largest |decoded average - exact FedAvg average| from quantisation (no clipping).

        Each site's stochastic rounding is off by less than one step of w·Δ, so the average is
        off by less than contributors · step · max_examples / Σ n_i.
        """
        return contributors * self.step * self.max_examples / total_count

    def _feasible(self, params: CKKSParams, sites: int) -> tuple[bool, int, int]:
        trial = Packing(
            self.bits, self.values_per_slot, sites, self.clip, self.max_examples, self.spill_bits
        )
        need = min_scale_bits(params, sites)
        have = max_scale_bits(params, trial.slot_bits)
        ok = (
            have >= need
            and trial.slot_bits <= MAX_EXACT_FLOAT_BITS
            and sites * self.max_examples < 2**trial.slot_bits
        )
        return ok, need, have

    def max_sites_for(self, params: CKKSParams) -> int:
        """The most sites this packing can sum exactly under ``params`` (0: none).

        Feasibility only gets worse with more sites (more headroom, more noise), so an
        exponential then binary search finds the edge.
        """
        if not self._feasible(params, 1)[0]:
            return 0
        lo, hi = 1, 2
        while hi < 1 << 24 and self._feasible(params, hi)[0]:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._feasible(params, mid)[0] else (lo, mid)
        return lo

    def scale_bits(self, params: CKKSParams) -> int:
        """Scale exponent s (slots hold integer·2^s); refuses packings that cannot be exact."""
        ok, need, have = self._feasible(params, self.max_sites)
        if ok:
            return have
        if self.slot_bits > MAX_EXACT_FLOAT_BITS:
            spill = f" + a {self.spill_field_bits}-bit spill field" if self.spill_bits else ""
            raise CKKSConfigError(
                f"he.values_per_slot = {self.values_per_slot} × (he.bits = {self.bits} + "
                f"{self.headroom_bits} headroom bits for he.max_sites = {self.max_sites}){spill} = "
                f"{self.slot_bits} bits per slot exceeds the {MAX_EXACT_FLOAT_BITS} bits a float64 "
                "holds exactly; lower he.bits or he.values_per_slot"
            )
        if self.max_sites * self.max_examples >= 2**self.slot_bits:
            raise CKKSConfigError(
                f"he.max_examples = {self.max_examples} × he.max_sites = {self.max_sites} does not "
                f"fit the {self.slot_bits}-bit count slot; lower he.max_examples"
            )
        limit = self.max_sites_for(params)
        hint = (
            f"at most {limit} sites work with this packing"
            if limit
            else "no number of sites works with this packing"
        )
        raise CKKSConfigError(
            f"he.max_sites = {self.max_sites} is too many for he.values_per_slot = "
            f"{self.values_per_slot} and he.bits = {self.bits}"
            f"{f' (spill {self.spill_bits} bits)' if self.spill_bits else ''} under CKKS "
            f"{params.describe()}: fields of {self.bits}+{self.headroom_bits} bits leave a "
            f"scale of 2^{have}, but "
            f"summing {self.max_sites} ciphertexts exactly needs at least 2^{need}; {hint} "
            "(or lower he.bits or he.values_per_slot)"
        )

    @property
    def checksum_moduli(self) -> tuple[int, ...]:
        """Moduli of the checksum fields after the values (:func:`checksum_moduli`)."""
        return checksum_moduli(self.bits)

    @property
    def checksum_fields(self) -> int:
        return len(self.checksum_moduli)

    def num_fields(self, num_values: int) -> int:
        """Fields an update packs: its values, then its checksums (then zero padding)."""
        return num_values + self.checksum_fields

    def slots_needed(self, num_values: int) -> int:
        return HEADER_SLOTS + self.payload_slots(self.num_fields(num_values))

    def num_blocks(self, num_values: int, params: CKKSParams, per_block: int | None = None) -> int:
        """Ciphertexts of an update: ``per_block`` slot integers each (default
        ``params.block_values``, two per CKKS slot; N/2 for formats 2 and 3)."""
        per_block = per_block or params.block_values
        return -(-self.slots_needed(num_values) // per_block)

    def block_lengths(
        self, num_values: int, params: CKKSParams, per_block: int | None = None
    ) -> list[int]:
        """Slot integers in each block: full blocks and a shorter last one."""
        per_block = per_block or params.block_values
        total = self.slots_needed(num_values)
        n = self.num_blocks(num_values, params, per_block)
        return [min(per_block, total - i * per_block) for i in range(n)]


def packing_for(he: HESpec, *, fisher: bool = False) -> Packing:
    """The codec's :class:`Packing` for an experiment's ``[he]`` weights (or Fisher diagonals).

    Builds the packing only; :func:`check_packing` says whether it can sum ``he.max_sites``
    ciphertexts exactly (``Packing.scale_bits`` refuses it again when encrypting or summing).
    """
    if he.max_sites is None:
        raise CKKSConfigError(
            "he.max_sites is not set: validate the experiment (ExperimentConfig fills it in "
            "with the round's size) or set he.max_sites"
        )
    values_per_slot = he.values_per_slot or values_per_slot_for(he.bits, he.max_sites)
    return Packing(
        bits=he.bits,
        values_per_slot=values_per_slot,
        max_sites=he.max_sites,
        clip=he.fisher_clip if fisher else he.clip,
        max_examples=he.max_examples,
        spill_bits=spill_bits_for(he.bits, values_per_slot, he.max_sites, he.max_examples),
    )


@cache
def values_per_slot_for(bits: int, max_sites: int) -> int:
    """The most values per slot (fewest bytes per parameter) that sum ``max_sites`` exactly.

    At the default 15 bits under N = 4096, [60, 49]: 2 (8 bytes per parameter of a full-size
    ciphertext, 2x fp32, two slot integers per CKKS slot) up to 32 sites a round, 1 (16 bytes,
    4x) beyond, up to 262,144 sites. Quantisation precision
    (``he.bits``) is kept and bytes are given up, because accuracy is the contract and bytes
    the cost. 1 when nothing fits: ``Packing.scale_bits`` then names the problem.
    """
    params = CKKSParams()
    for values in (3, 2, 1):
        if Packing(bits=bits, values_per_slot=values).max_sites_for(params) >= max_sites:
            return values
    return 1


@cache
def spill_bits_for(bits: int, values_per_slot: int, max_sites: int, max_examples: int) -> int:
    """The widest spill field a round of ``max_sites`` leaves room for (0: none), under the
    default parameters of ``fedcl keys init`` (N = 4096, [60, 49]), as ``values_per_slot_for``.

    Why: the scale only has to keep the noise of ``max_sites`` summed ciphertexts below 0.5
    (:func:`~.params.min_scale_bits`); the data prime's bits above that and the full fields are
    spare. At 15 bits and 5 sites a slot has 58 - 17 = 41 usable bits, the two 18-bit fields take
    36, and a 2-bit spill field with its 3 headroom bits the other 5: 2.125 values per slot, 6 %
    fewer bytes (the default scenario's 16,706 parameters needed 4 ciphertexts instead of 5 when
    a block held N/2 slot integers; 2 at N, wire format 4). The
    scale is then the smallest the noise model allows (as at 20 sites, where no spill fits);
    precision (``bits``) is unchanged. 0 when fewer than 1 data bit would be left.
    """
    params = CKKSParams()
    for spill in range(bits, 0, -1):
        try:
            trial = Packing(bits, values_per_slot, max_sites, 1.0, max_examples, spill)
            trial.scale_bits(params)
        except CKKSConfigError:
            continue
        return spill
    return 0


def bytes_per_parameter(packing: Packing, params: CKKSParams | None = None) -> float:
    """Ciphertext bytes per model parameter of a fresh encryption (before padding)."""
    params = params or CKKSParams()
    ciphertext = 2 * params.poly_modulus_degree * 8 * params.data_primes
    return ciphertext / (params.block_values * packing.values_per_slot_effective)


def check_packing(he: HESpec) -> None:
    """Refuse ``[he]`` settings whose weight packing cannot sum ``he.max_sites`` sites exactly.

    Checked under the default parameters of ``fedcl keys init`` (:class:`CKKSParams`), whatever
    ``he.enabled`` says: callers check only when HE is on. Raises a
    :class:`~fedcl.config.ConfigError` naming the ``he.*`` field and what would be valid.
    """
    try:
        packing_for(he).scale_bits(CKKSParams())
    except CKKSConfigError as exc:
        raise ConfigError(str(exc)) from None
