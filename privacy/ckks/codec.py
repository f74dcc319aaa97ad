"""From a site's model update to CKKS blocks and back: layout, quantisation, packing.

What a site encrypts (and why)
------------------------------
FedAvg needs Σ n_i·Δ_i / Σ n_i. The coordinator may only add, and must not learn n_i, so each
site sends, inside the ciphertext, both its weighted update and its weight:

* **Layout**: the state dict is flattened in a fixed order (:class:`Layout`: names, shapes,
  dtypes). Its SHA-256 travels with every message so a site with another model is rejected
  instead of being added into the wrong coordinates.
* **Weight**: w_i = min(n_i, max_examples) / max_examples, in [0, 1]. Sites cannot know each
  other's counts, so a common unit is a setting; a site with more than ``max_examples`` examples
  is weighted as ``max_examples`` (logged at the site). Sites far smaller than the unit keep
  less of their own precision, but the error of the *average* stays within
  :meth:`Packing.error_bound`.
* **Clipping**: Δ is clipped to [-clip, clip] *before* weighting; values outside are clipped and
  counted (:attr:`EncodeStats.clipped`; the site decides whether to report the fraction), not
  refused, because one outlier weight must not cost a site its round. NaN or inf is refused
  (:class:`UpdateError` naming the tensor) before anything is encrypted.
* **Quantisation**: y = w·Δ / step with step = clip / (2^(bits-1) - 1), rounded
  *stochastically* (floor(y + u), u ~ U[0, 1)): unbiased, E[q] = y, and |q - y| < 1. The integer
  r ∈ [-(2^(bits-1)-1), 2^(bits-1)-1] is offset by ``offset`` = 2^(bits-1) - 1 to be unsigned,
  so q ∈ [0, 2^bits - 2].
* **Packing**: each field gets ``bits + headroom`` bits, headroom = ceil(log2(max_sites)), so the
  sum of up to ``max_sites`` fields never carries into its neighbour; ``values_per_slot``
  fields share one slot as q0 + q1·2^F + q2·2^2F. The first two slots of block 0 hold the
  contributor count (1) and the capped example count: after summation the sites learn both and
  the coordinator neither. Decoding subtracts offset × contributors from every field.
* **Exactness**: slots are integers times the scale 2^s; :meth:`Packing.scale_bits` picks the
  largest s that fits the data prime and refuses (:class:`CKKSConfigError`) a packing whose s
  would let the noise of ``max_sites`` summed ciphertexts reach 0.5.

Encrypting is TenSEAL's cost and holds the GIL, so large updates are encrypted in worker
processes (:mod:`.parallel`); small ones stay in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcl.config.errors import ConfigError

from .errors import AggregateError, CKKSConfigError, UpdateError
from .params import MAX_EXACT_FLOAT_BITS, CKKSParams, max_scale_bits, min_scale_bits

if TYPE_CHECKING:
    from fedcl.config.experiment import HESpec

logger = logging.getLogger("fedcl.privacy.ckks")

#: Slots at the start of block 0: contributor count, capped example count.
HEADER_SLOTS = 2
LAYOUT_VERSION = "fedcl-layout-1"

#: Decrypted values further than this from an integer mean a wrong key, a corrupt block, or
#: noise beyond the model. Measured honest sums: max 0.10 (20 sites) and 0.14 (32 sites, the most
#: the default packing allows) over 123k slots; a garbage block has uniform fractions, so 2048
#: slots all below 0.4 by chance has probability 0.8^2048.
MAX_FRACTION = 0.4


# --- layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _dtype_name(tensor: Any) -> str:
    dtype = str(tensor.dtype)
    return dtype.removeprefix("torch.")


def _as_float64(tensor: Any) -> np.ndarray:
    """A torch tensor or numpy array as a float64 numpy array (copying only when needed)."""
    if hasattr(tensor, "detach"):
        import torch

        return tensor.detach().to("cpu", torch.float64).numpy()
    return np.asarray(tensor, dtype=np.float64)


@dataclass(frozen=True)
class Layout:
    """The fixed order in which a state dict is flattened: names, shapes, dtypes."""

    entries: tuple[LayoutEntry, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Layout:
        return cls(
            tuple(
                LayoutEntry(str(k), tuple(int(d) for d in v.shape), _dtype_name(v))
                for k, v in state.items()
            )
        )

    @cached_property
    def hash(self) -> str:
        """SHA-256 of names, shapes, dtypes and their order: what replies are checked against."""
        desc = [LAYOUT_VERSION] + [[e.name, list(e.shape), e.dtype] for e in self.entries]
        return hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode()).hexdigest()

    @cached_property
    def num_values(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def flatten(self, state: Mapping[str, Any]) -> np.ndarray:
        """All values in layout order as float64; refuses NaN/inf naming the tensor."""
        missing = [e.name for e in self.entries if e.name not in state]
        extra = [k for k in state if k not in {e.name for e in self.entries}]
        if missing or extra:
            raise UpdateError(
                f"update does not match the model layout: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        flat = np.empty(self.num_values, dtype=np.float64)
        pos = 0
        for e in self.entries:
            arr = _as_float64(state[e.name])
            if tuple(arr.shape) != e.shape:
                raise UpdateError(
                    f"tensor {e.name!r} has shape {tuple(arr.shape)}, the layout says {e.shape}"
                )
            if not np.isfinite(arr).all():
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise UpdateError(
                    f"tensor {e.name!r} has {bad} NaN/inf value(s): refusing to encrypt this "
                    "update (training diverged? lower the learning rate or check the data)"
                )
            flat[pos : pos + e.size] = arr.reshape(-1)
            pos += e.size
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        pos = 0
        for e in self.entries:
            out[e.name] = flat[pos : pos + e.size].reshape(e.shape)
            pos += e.size
        return out


# --- packing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Packing:
    """Quantisation and packing settings (what the codec needs of the experiment's HESpec)."""

    bits: int = 15
    values_per_slot: int = 2
    max_sites: int = 20
    clip: float = 0.5
    max_examples: int = 10_000

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

    @property
    def headroom_bits(self) -> int:
        """ceil(log2(max_sites)): room for the carry of summing every site's field."""
        return (self.max_sites - 1).bit_length()

    @property
    def field_bits(self) -> int:
        return self.bits + self.headroom_bits

    @property
    def slot_bits(self) -> int:
        return self.values_per_slot * self.field_bits

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
        trial = Packing(self.bits, self.values_per_slot, sites, self.clip, self.max_examples)
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
            raise CKKSConfigError(
                f"he.values_per_slot = {self.values_per_slot} × (he.bits = {self.bits} + "
                f"{self.headroom_bits} headroom bits for he.max_sites = {self.max_sites}) = "
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
            f"{self.values_per_slot} and he.bits = {self.bits} under CKKS {params.describe()}: "
            f"fields of {self.bits}+{self.headroom_bits} bits leave a scale of 2^{have}, but "
            f"summing {self.max_sites} ciphertexts exactly needs at least 2^{need}; {hint} "
            "(or lower he.bits or he.values_per_slot)"
        )

    def slots_needed(self, num_values: int) -> int:
        return HEADER_SLOTS + -(-num_values // self.values_per_slot)

    def num_blocks(self, num_values: int, params: CKKSParams) -> int:
        return -(-self.slots_needed(num_values) // params.slots)

    def block_lengths(self, num_values: int, params: CKKSParams) -> list[int]:
        """Slots in each block: full N/2 blocks and a shorter last one."""
        total = self.slots_needed(num_values)
        n = self.num_blocks(num_values, params)
        return [min(params.slots, total - i * params.slots) for i in range(n)]


def packing_for(he: HESpec, *, fisher: bool = False) -> Packing:
    """The codec's :class:`Packing` for an experiment's ``[he]`` weights (or Fisher diagonals).

    Builds the packing only; :func:`check_packing` says whether it can sum ``he.max_sites``
    ciphertexts exactly (``Packing.scale_bits`` refuses it again when encrypting or summing).
    """
    return Packing(
        bits=he.bits,
        values_per_slot=he.values_per_slot,
        max_sites=he.max_sites,
        clip=he.fisher_clip if fisher else he.clip,
        max_examples=he.max_examples,
    )


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


def quantise(
    flat: np.ndarray, weight: float, packing: Packing, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Clip, weight and stochastically round: unsigned integers in [0, 2^bits - 2], and the
    number of values that were clipped."""
    if not 0.0 < weight <= 1.0:
        raise UpdateError(f"weight {weight} outside (0, 1]")
    clipped = int(np.count_nonzero(np.abs(flat) > packing.clip))
    y = np.clip(flat, -packing.clip, packing.clip)
    y *= weight / packing.step
    y += rng.random(y.shape[0])
    q = np.floor(y).astype(np.int64)
    # |w·Δ/step| <= offset guarantees the range; the clip only guards float rounding at the edge.
    np.clip(q, -packing.offset, packing.offset, out=q)
    q += packing.offset
    return q, clipped


def pack(q: np.ndarray, packing: Packing) -> np.ndarray:
    """``values_per_slot`` unsigned fields per slot: q0 + q1·2^F + q2·2^2F (int64)."""
    m = packing.values_per_slot
    pad = (-q.shape[0]) % m
    if pad:
        q = np.concatenate([q, np.zeros(pad, dtype=np.int64)])
    cols = q.reshape(-1, m)
    slots = cols[:, 0].copy()
    for j in range(1, m):
        slots |= cols[:, j] << (packing.field_bits * j)
    return slots


def unpack(slots: np.ndarray, packing: Packing, num_values: int) -> np.ndarray:
    """Inverse of :func:`pack` for summed slots (every field < 2^F by the headroom)."""
    m, f = packing.values_per_slot, packing.field_bits
    mask = (1 << f) - 1
    out = np.empty((slots.shape[0], m), dtype=np.int64)
    for j in range(m):
        out[:, j] = (slots >> (f * j)) & mask
    return out.reshape(-1)[:num_values]


@dataclass
class EncodeStats:
    """What a site learns about its own encoding (site-local; nothing here is sent by default)."""

    num_values: int
    num_blocks: int
    clipped: int
    weight_capped: bool
    seconds: float
    workers: int

    @property
    def clipped_fraction(self) -> float:
        return self.clipped / max(1, self.num_values)

    def metrics(self) -> dict[str, float]:
        """Metrics a site may report: no counts of examples, only how much was clipped."""
        return {
            "ckks-clipped-fraction": self.clipped_fraction,
            "ckks-encrypt-seconds": self.seconds,
        }


@dataclass
class EncodedBlocks:
    blocks: list[bytes]
    scale_bits: int
    layout: Layout
    stats: EncodeStats


def slot_vector(
    delta: Mapping[str, Any],
    num_examples: int,
    packing: Packing,
    layout: Layout,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int, bool]:
    """The plaintext slots of one site's update: header then packed fields (float64)."""
    if int(num_examples) != num_examples or num_examples < 1:
        raise UpdateError(f"an update needs a positive integer example count, got {num_examples}")
    flat = layout.flatten(delta)  # NaN/inf refused here, before anything is encrypted
    capped = num_examples > packing.max_examples
    count = min(int(num_examples), packing.max_examples)
    if capped:
        logger.warning(
            "site update: %d examples exceed he.max_examples = %d; weighted as %d",
            num_examples,
            packing.max_examples,
            packing.max_examples,
        )
    q, clipped = quantise(flat, count / packing.max_examples, packing, rng)
    del flat
    slots = np.empty(packing.slots_needed(layout.num_values), dtype=np.float64)
    slots[0] = 1.0
    slots[1] = float(count)
    slots[HEADER_SLOTS:] = pack(q, packing)
    return slots, clipped, capped


def encode_blocks(
    delta: Mapping[str, Any],
    num_examples: int,
    ctx,
    packing: Packing,
    *,
    layout: Layout | None = None,
    rng: np.random.Generator | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> EncodedBlocks:
    """Encrypt one site's update Δ (weighted by its example count) into serialized blocks."""
    from .parallel import encrypt_rows
    from .params import params_of

    start = time.perf_counter()
    layout = layout or Layout.from_state_dict(delta)
    params = params_of(ctx)
    scale_bits = packing.scale_bits(params)
    slots, clipped, capped = slot_vector(
        delta, num_examples, packing, layout, rng or np.random.default_rng()
    )
    rows = [slots[i : i + params.slots] for i in range(0, slots.shape[0], params.slots)]
    blocks, used = encrypt_rows(
        rows, ctx, float(2**scale_bits), workers=workers, min_blocks=parallel_min_blocks
    )
    stats = EncodeStats(
        num_values=layout.num_values,
        num_blocks=len(blocks),
        clipped=clipped,
        weight_capped=capped,
        seconds=time.perf_counter() - start,
        workers=used,
    )
    return EncodedBlocks(blocks, scale_bits, layout, stats)


@dataclass
class DecodedSum:
    """A decrypted aggregate: the FedAvg mean Δ and what the sites learn with it."""

    mean: dict[str, np.ndarray]
    total_count: int
    contributors: int
    field_sums: np.ndarray = field(repr=False)  # Σ of the sites' signed quantised integers


def decode_slots(
    values: np.ndarray,
    packing: Packing,
    layout: Layout,
    *,
    expected_contributors: int | None = None,
) -> DecodedSum:
    """Turn decrypted slot values into the average Δ; every check names what went wrong."""
    rounded = np.rint(values)
    worst = float(np.max(np.abs(values - rounded))) if values.size else 0.0
    if not worst <= MAX_FRACTION:
        raise AggregateError(
            f"the aggregate does not decrypt to integers (off by up to {worst:.3g}): wrong key, a "
            "corrupt block, or more sites than the packing's noise budget"
        )
    if values.shape[0] != packing.slots_needed(layout.num_values):
        raise AggregateError(
            f"the aggregate has {values.shape[0]} slots, the layout needs "
            f"{packing.slots_needed(layout.num_values)}"
        )
    ints = rounded.astype(np.int64)
    contributors, total = int(ints[0]), int(ints[1])
    if expected_contributors is not None and contributors != expected_contributors:
        raise AggregateError(
            f"the aggregate says {contributors} sites contributed, its metadata says "
            f"{expected_contributors}: refusing a tampered or corrupt aggregate"
        )
    if not 1 <= contributors <= packing.max_sites:
        raise AggregateError(
            f"the aggregate sums {contributors} sites; the packing allows 1..{packing.max_sites}"
        )
    if not contributors <= total <= contributors * packing.max_examples:
        raise AggregateError(
            f"the aggregate's example count {total} is impossible for {contributors} sites"
        )
    slots = ints[HEADER_SLOTS:]
    if slots.size and (slots.min() < 0 or slots.max() >= 2**packing.slot_bits):
        raise AggregateError("the aggregate overflows its packing (more sites than he.max_sites?)")
    sums = unpack(slots, packing, layout.num_values) - packing.offset * contributors
    mean = sums.astype(np.float64) * (packing.step * packing.max_examples / total)
    return DecodedSum(layout.unflatten(mean), total, contributors, sums)


def decode_blocks(
    blocks: list[bytes],
    ctx,
    packing: Packing,
    layout: Layout,
    *,
    expected_contributors: int | None = None,
    workers: int | None = None,
    parallel_min_blocks: int | None = None,
) -> DecodedSum:
    """Decrypt (with the site's secret context) and decode an aggregate."""
    from .parallel import decrypt_blocks

    rows, _ = decrypt_blocks(blocks, ctx, workers=workers, min_blocks=parallel_min_blocks)
    values = np.concatenate(rows) if rows else np.empty(0)
    return decode_slots(values, packing, layout, expected_contributors=expected_contributors)
