"""Scattering features + a small CNN: a model that DP-SGD trains well on few examples.

Why: DP-SGD adds noise to every trainable parameter, so a model whose first layers must be
*learned* from a site's few thousand images spends much of its privacy budget learning edge
and texture detectors. Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better
features") show that a fixed, data-independent front end, the wavelet scattering transform
(Bruna & Mallat 2013), followed by a small trained CNN beats end-to-end CNNs under DP at equal
ε. The front end reads no data, so it costs no privacy, and it is not a parameter: its filters
are non-persistent buffers, outside the state dict, so they never travel, are never averaged
or encrypted, and every site rebuilds the same ones.

This is the transform's first order (J = 2 scales, L = 8 orientations): for each colour
channel the input smoothed by a Gaussian low-pass φ, and ``|x * ψ_{j,θ}| * φ`` for the 16 complex
Morlet wavelets ψ, each subsampled by 2^J: ``(1 + J·L)·C`` maps at a quarter of the resolution.
The filters follow Kymatio's Morlet definitions (σ = 0.8·2^j, ξ = 3π/4 / 2^j, slant 4/L, φ at
σ = 0.8·2^(J-1)), built in the spatial domain and applied as fixed convolutions with reflected
borders. Kymatio itself is not a dependency: its torch front end computes both orders by FFT at
~6 ms an image on one CPU thread (measured; docs/notes/measurements.md), its top-level import
fails on SciPy >= 1.15, and on the defects benchmark the first order alone trained as well
under DP. The features are normalised per example (GroupNorm without affine parameters, per
group of three maps as in Tramèr & Boneh), which keeps each example's gradient its own.
"""

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .cnn import conv_block

MIN_IMAGE_SIZE = 16  # the reflected border (10 px at j = 1) needs more than 10 px a side
DEFAULT_CHANNELS: tuple[int, int] = (16, 16)
#: Per-process memo of examples' features (see :class:`FeatureMemo`): ~13 KB an example at
#: 32x32 RGB (as large as the image itself), so 40,000 examples, the whole defects benchmark.
MEMO_BYTES = 512 * 2**20
J = 2  # scales: features at 1/4 of the input resolution
L = 8  # orientations


def _gabor(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """Kymatio's ``gabor_2d`` on a centred ``size x size`` grid (no periodisation needed:
    the grid spans > 3 envelope widths)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r, indexing="ij")
    arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
    wave = np.exp(arg + 1j * xi * (xx * c + yy * s))
    return wave / (2 * math.pi * sigma * sigma / slant)


def _morlet(size: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """A Gabor wavelet minus its envelope's share, so it sums to zero (Kymatio's ``morlet_2d``)."""
    wave = _gabor(size, sigma, theta, xi, slant)
    envelope = _gabor(size, sigma, theta, 0.0, slant)
    return wave - wave.sum() / envelope.sum() * envelope


def _support(sigma: float, slant: float) -> int:
    """Odd kernel size covering ±3 envelope widths along the wavelet's long axis."""
    return 2 * math.ceil(3 * sigma / slant) + 1


class Scattering(nn.Module):
    """First-order 2D scattering of each input channel: ``(B, C, H, W) -> (B, C·17, H/4, W/4)``."""

    def __init__(self) -> None:
        super().__init__()
        slant = 4.0 / L
        for j in range(J):
            # φ at each resolution the maps live at: σ = 0.8·2^(J-1) on the input's grid is
            # 0.8·2^(J-1-j) on a grid subsampled by 2^j
            sigma = 0.8 * 2 ** (J - 1 - j)
            phi = _gabor(_support(sigma, 1.0), sigma, 0.0, 0.0, 1.0).real
            phi /= phi.sum()  # the truncated Gaussian passes a constant unchanged
            self.register_buffer(
                f"phi{j}", torch.tensor(phi, dtype=torch.float32)[None, None], False
            )
            sigma, xi = 0.8 * 2**j, 3.0 / 4.0 * math.pi / 2**j
            psi = [
                _morlet(
                    _support(sigma, slant), sigma, (L - L // 2 - 1 - t) * math.pi / L, xi, slant
                )
                for t in range(L)
            ]
            # real and imaginary parts as 2L real output channels, interleaved per orientation
            bank = np.stack([part for p in psi for part in (p.real, p.imag)])
            self.register_buffer(f"psi{j}", torch.tensor(bank, dtype=torch.float32)[:, None], False)

    @property
    def out_per_channel(self) -> int:
        return 1 + J * L

    @staticmethod
    def _conv(x: torch.Tensor, bank: torch.Tensor, stride: int) -> torch.Tensor:
        """Each map of ``x`` (``(N, 1, H, W)``) through ``bank``, reflected borders."""
        pad = bank.shape[-1] // 2
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), bank, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b * c, 1, h, w)
        out = []
        for j in range(J):
            # |x * ψ_j| sampled every 2^j pixels, as Kymatio keeps it (ψ_j's band allows it)
            z = self._conv(flat, getattr(self, f"psi{j}"), stride=2**j)  # (B·C, 2L, ., .)
            u = torch.sqrt(z[:, 0::2] ** 2 + z[:, 1::2] ** 2 + 1e-12)  # smooth at 0
            if j == 0:
                u = torch.cat([flat, u], dim=1)  # order 0 shares the full-resolution low-pass
            n, m = u.shape[:2]
            s = self._conv(
                u.reshape(n * m, 1, *u.shape[-2:]), getattr(self, f"phi{j}"), 2 ** (J - j)
            )
            out.append(s.reshape(n, m, *s.shape[-2:]))
        s = torch.cat(out, dim=1)  # (B·C, 1 + J·L, H/2^J, W/2^J)
        return s.reshape(b, c * self.out_per_channel, *s.shape[-2:])


def _is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (vmap/grad), which has no bytes to hash."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return True if check is None else bool(check(x))  # unknown torch: never memoise


class FeatureMemo:
    """Content-addressed memo of each example's fixed features, bounded in bytes (LRU).

    Why: the front end is ~0.9 ms an image on one CPU thread, more than the trained CNN's
    forward and backward, and a site pushes the same images through it every epoch, every
    round (and every evaluation). Its output depends on the example's pixels alone, so it is
    keyed by a digest of those bytes (and dtype and shape): a new model instance each round,
    another site in the same process or a reordered Poisson batch all hit it, and a changed
    image can never be served stale features. Only plain CPU tensors are memoised (a GPU
    computes the transform faster than it could hash; a ``torch.func`` wrapper has no bytes).
    """

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        tag = f"{row.dtype}{tuple(row.shape)}".encode()
        return hashlib.blake2b(row.contiguous().numpy().tobytes(), digest_size=16, key=tag).digest()

    def __call__(
        self, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``compute(x)``, row by row from the memo where it holds the row."""
        if (
            x.device.type != "cpu"
            or x.requires_grad
            or self.max_bytes <= 0
            # inside torch.func transforms (the EWC Fisher's vmap over grad) an example is a
            # wrapper with no storage of its own to hash: compute it
            or _is_transformed(x)
        ):
            return compute(x)
        keys = [self._key(row) for row in x]
        rows: list[torch.Tensor | None] = [self._rows.get(k) for k in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for k, row in zip(keys, rows, strict=True):
            if row is not None:
                self._rows.move_to_end(k)
        if missing:
            fresh = compute(x[missing])
            for n, i in enumerate(missing):
                rows[i] = fresh[n].clone()
                self._store(keys[i], rows[i])
        return torch.stack(rows)

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        if key in self._rows:  # the same example twice in one batch
            return
        self._rows[key] = row
        self._bytes += row.numel() * row.element_size()
        while self._bytes > self.max_bytes and self._rows:
            _, old = self._rows.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()


#: One memo per process, shared by every ScatterCNN (their front ends are identical).
MEMO = FeatureMemo()


class ScatterCNN(nn.Module):
    """Fixed scattering front end, per-example normalisation, then a trained two-stage CNN."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: tuple[int, int] = DEFAULT_CHANNELS,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.scattering = Scattering()
        width = in_channels * self.scattering.out_per_channel
        # groups of three maps (Tramèr & Boneh's 27 groups of 243), no affine: nothing to learn
        self.norm = nn.GroupNorm(width // 3 if width % 3 == 0 else 1, width, affine=False)
        self.features = nn.Sequential(
            *conv_block(width, c1, False), nn.MaxPool2d(2), *conv_block(c1, c2, False)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        with torch.no_grad():  # fixed filters, no parameter before them: nothing to backprop
            f = MEMO(x, lambda batch: self.norm(self.scattering(batch)))
        return self.head(torch.flatten(self.pool(self.features(f)), 1))
