"""What every weight format is: a row of the format table, and the quantized weight it produces.

A group format stores per-group float16 scales (and, for asymmetric integer grids, float16 offsets)
next to packed codes; docs/formats.md is the bit-exact specification.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import PACK_BLOCK, pack_codes, packed_width, unpack_codes

SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0
# Range shrink factors tried by the "mse" scale search (docs/formats.md).
MSE_SHRINK_FACTORS = tuple(1.0 - 0.02 * i for i in range(20))
SCALE_METHODS = ("mse", "absmax")
# Rows quantized at once: bounds the temporaries of the scale search for huge (expert) tensors.
_ROWS_ELEMENTS_PER_CHUNK = 1 << 22


class QuantizedWeight(ABC):
    """A quantized weight matrix ``[..., N, K]``: the format's tensors plus what is needed to read them."""

    format: GroupFormat
    shape: tuple[int, ...]

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (what a checkpoint holds)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        numel = 1
        for d in self.shape:
            numel *= d
        return 8.0 * self.nbytes / numel


@dataclass(eq=False)
class GroupQuantizedWeight(QuantizedWeight):
    """Codes packed along K with one scale (and optional offset) per ``group_size`` weights."""

    format: GroupFormat
    shape: tuple[int, ...]
    packed: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int

    @property
    def symmetric(self) -> bool:
        return self.offsets is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.format.dequantize(self).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "scales": self.scales}
        if self.offsets is not None:
            out["offsets"] = self.offsets
        return out

    def to(self, device: torch.device | str) -> GroupQuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GroupQuantizedWeight(
            self.format, self.shape, move(self.packed), move(self.scales), move(self.offsets), self.group_size
        )

    @staticmethod
    def stack(weights: list[GroupQuantizedWeight]) -> GroupQuantizedWeight:
        """Matrices of one layout stacked into an expert weight ``[E, N, K]``."""
        first = weights[0]
        if any((w.format, tuple(w.shape), w.group_size, w.symmetric) !=
               (first.format, tuple(first.shape), first.group_size, first.symmetric) for w in weights):
            raise ValueError("only weights of one format, shape, group size and symmetry can be stacked")
        offsets = None if first.offsets is None else torch.stack([w.offsets for w in weights])
        packed = torch.stack([w.packed for w in weights])
        scales = torch.stack([w.scales for w in weights])
        return GroupQuantizedWeight(first.format, (len(weights), *first.shape), packed, scales, offsets,
                                    first.group_size)

    def __getitem__(self, index: int) -> GroupQuantizedWeight:
        """One matrix of a stacked (expert) weight ``[E, N, K]``."""
        if len(self.shape) != 3:
            raise IndexError("only stacked [E, N, K] weights can be indexed")
        offsets = None if self.offsets is None else self.offsets[index]
        return GroupQuantizedWeight(
            self.format, self.shape[1:], self.packed[index], self.scales[index], offsets, self.group_size
        )


def resolve_group_size(group_size: int, k: int, name: str = "weight") -> int:
    """The actual group length: ``-1`` means per-channel (one group per row of length K). A group size
    that does not divide K leaves a shorter last group (docs/formats.md)."""
    if k % PACK_BLOCK:
        raise ValueError(f"{name}: in_features K={k} is not divisible by the {PACK_BLOCK}-weight packing block "
                         f"(group_size={group_size} needs K to be a multiple of {PACK_BLOCK})")
    if group_size == -1:
        return k
    if group_size <= 0 or group_size % PACK_BLOCK:
        raise ValueError(
            f"{name}: group_size={group_size} is not supported (use 32, 64, 128, another multiple of "
            f"{PACK_BLOCK}, or -1 for per-channel)"
        )
    return min(group_size, k)


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _round_to_fp16(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if torch.any(t.abs() > FP16_MAX):
        raise ValueError(f"{name}: a {what} exceeds the float16 range (|{what}| > {FP16_MAX})")
    return t.to(SCALE_DTYPE).to(torch.float32)


class GroupFormat(ABC):
    """One row of the format table: a code grid with per-group scales.

    Subclasses define the grid: ``code_values`` (value of each code for a unit scale, symmetric
    grid), ``qmax`` (the magnitude a group's absmax maps to) and ``encode`` (nearest code).
    """

    name: ClassVar[str]
    bits: ClassVar[int]
    qmax: ClassVar[float]
    supports_asymmetric: ClassVar[bool] = False
    default_symmetric: ClassVar[bool] = True
    tensor_names: ClassVar[tuple[str, ...]] = ("packed", "scales", "offsets")

    @abstractmethod
    def code_values(self) -> torch.Tensor:
        """float64 ``[2**bits]``: the value of each code at scale 1 (symmetric grid)."""

    @abstractmethod
    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """Nearest code (int64) for values already divided by the scale (symmetric grid)."""

    def __repr__(self) -> str:
        return f"<format {self.name}: {self.bits} bits>"

    # -- packing -------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_codes(packed, self.bits)

    def packed_shape(self, n: int, k: int) -> tuple[int, int]:
        return (n, packed_width(k, self.bits))

    # -- reference dequantize ------------------------------------------------------------------
    def dequantize(self, qw: GroupQuantizedWeight) -> torch.Tensor:
        codes = self.unpack(qw.packed).long()
        k = qw.shape[-1]
        g = qw.group_size
        scales = qw.scales.float().repeat_interleave(g, dim=-1)[..., :k]
        if qw.offsets is None:
            table = self.code_values().to(device=codes.device, dtype=torch.float32)
            return table[codes] * scales
        offsets = qw.offsets.float().repeat_interleave(g, dim=-1)[..., :k]
        return codes.float() * scales + offsets

    # -- reference quantize (round to nearest) -------------------------------------------------
    def quantize(
        self,
        w: torch.Tensor,
        *,
        group_size: int = 128,
        symmetric: bool | None = None,
        scale_method: str = "mse",
        name: str = "weight",
    ) -> GroupQuantizedWeight:
        """Round-to-nearest quantization of ``w`` (``[N, K]`` or stacked ``[E, N, K]``)."""
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
        if w.dim() not in (2, 3):
            raise ValueError(f"{name}: expected a 2-D [N, K] or 3-D [E, N, K] weight, got shape {tuple(w.shape)}")
        if scale_method not in SCALE_METHODS:
            raise ValueError(f"{name}: unknown scale_method {scale_method!r}; choose from {SCALE_METHODS}")
        symmetric = self.default_symmetric if symmetric is None else symmetric
        if not symmetric and not self.supports_asymmetric:
            raise ValueError(f"{name}: format {self.name} has no asymmetric (offset) variant")
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
        k = w.shape[-1]
        g = resolve_group_size(group_size, k, name)

        rows = w.detach().reshape(-1, k)
        chunk = max(1, _ROWS_ELEMENTS_PER_CHUNK // k)
        parts = [self._quantize_rows(rows[i : i + chunk].float(), g, symmetric, scale_method, name)
                 for i in range(0, rows.shape[0], chunk)]
        codes = torch.cat([p[0] for p in parts])
        scales = torch.cat([p[1] for p in parts])
        lead = tuple(w.shape[:-1])
        packed = self.pack(codes).reshape(*lead, -1)
        scales = scales.to(SCALE_DTYPE).reshape(*lead, -1)
        offsets = None if symmetric else torch.cat([p[2] for p in parts]).to(SCALE_DTYPE).reshape(*lead, -1)
        return GroupQuantizedWeight(self, tuple(w.shape), packed, scales, offsets, g)

    def _quantize_rows(self, rows: torch.Tensor, g: int, symmetric: bool, scale_method: str, name: str):
        """Codes ``[R, K]`` and per-group scales (and offsets) ``[R, ceil(K/g)]``; a shorter last group
        is quantized on its own."""
        k = rows.shape[1]
        full = (k // g) * g
        parts = [self._quantize_groups(rows[:, :full].reshape(rows.shape[0], -1, g), symmetric, scale_method, name)]
        if full < k:
            parts.append(self._quantize_groups(rows[:, full:].unsqueeze(1), symmetric, scale_method, name))
        codes = torch.cat([p[0].reshape(rows.shape[0], -1) for p in parts], dim=1)
        scales = torch.cat([p[1] for p in parts], dim=1)
        offsets = None if symmetric else torch.cat([p[2] for p in parts], dim=1)
        return codes, scales, offsets

    def encode_with(self, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
        """Nearest codes (int64) of ``w [..., g]`` given per-group scales ``s [...]`` (and offsets)."""
        if o is None:
            return self.encode(w / s.unsqueeze(-1))
        levels = 2**self.bits - 1
        return torch.round((w - o.unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, levels).long()

    def decode_with(self, codes: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
        """Values of ``codes [..., g]`` with per-group scales ``s [...]`` (and offsets), float32."""
        if o is None:
            table = self.code_values().to(device=codes.device, dtype=torch.float32)
            return table[codes] * s.unsqueeze(-1)
        return codes * s.unsqueeze(-1) + o.unsqueeze(-1)

    def _scale_candidate(self, wg: torch.Tensor, p: float, symmetric: bool, name: str):
        """float16-rounded scale (and offset) of groups ``wg [..., g]`` for range shrink factor ``p``."""
        if symmetric:
            s = _round_to_fp16(p * wg.abs().amax(dim=-1) / self.qmax, "scale", name)
            return torch.where(s == 0, torch.ones_like(s), s), None
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        s = _round_to_fp16(2 * p * half / (2**self.bits - 1), "scale", name)
        return torch.where(s == 0, torch.ones_like(s), s), _round_to_fp16(mid - p * half, "offset", name)

    def choose_scales(self, wg: torch.Tensor, symmetric: bool, scale_method: str = "mse", name: str = "weight"):
        """Per-group scales (and offsets) of ``wg [..., g]`` by the documented search."""
        return self._quantize_groups(wg, symmetric, scale_method, name)[1:]

    def _quantize_groups(self, wg: torch.Tensor, symmetric: bool, scale_method: str, name: str):
        """Round-to-nearest of groups ``wg [..., g]``: codes (uint8), scales, offsets."""
        shrink = MSE_SHRINK_FACTORS if scale_method == "mse" else (1.0,)
        best = None
        for p in shrink:
            s, o = self._scale_candidate(wg, p, symmetric, name)
            codes = self.encode_with(wg, s, o)
            err = (self.decode_with(codes, s, o) - wg).square_().sum(dim=-1)
            if best is None:
                best = [err, codes, s, o]
                continue
            better = err < best[0]
            best[0] = torch.where(better, err, best[0])
            best[1] = torch.where(better.unsqueeze(-1), codes, best[1])
            best[2] = torch.where(better, s, best[2])
            if o is not None:
                best[3] = torch.where(better, o, best[3])
        _, codes, s, o = best
        return codes.to(torch.uint8), s, o
