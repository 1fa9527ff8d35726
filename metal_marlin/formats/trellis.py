"""The trellis format: bitshift-trellis codes over 16x16 tiles with incoherence processing.

Bit-exact specification: docs/formats.md, "Trellis format". This module holds the reference
(pure torch / numpy) codebooks, stream decoding and reconstruction; choosing the codes (Viterbi,
LDLQ) lives in ``metal_marlin.quant.trellis``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .base import QuantizedWeight
from .hadamard import hadamard_transform

TILE = 16
TILE_STEPS = TILE * TILE
STATE_BITS = 16
BITS_RANGE = range(1, 9)
CODEBOOKS = ("3inst", "1mad", "mcg", "mul1")


def _mask_xor_half_sum(x: np.ndarray) -> np.ndarray:
    """3inst / mcg tail: keep sign + 12 low bits of each half, xor in an exponent, add the halves."""
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60
    lo = (x & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (x >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return (lo + hi).astype(np.float16).astype(np.float32)  # float64 sum is exact; one rounding to fp16


def _byte_sum(x: np.ndarray) -> np.ndarray:
    return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)


@cache
def codebook_values(codebook: str) -> torch.Tensor:
    """float32 ``[65536]``: the value of every 16-bit state (docs/formats.md codebook table)."""
    s = np.arange(1 << STATE_BITS, dtype=np.uint64)
    m32 = np.uint64(0xFFFFFFFF)
    if codebook == "3inst":
        values = _mask_xor_half_sum((s * np.uint64(89226354) + np.uint64(64248484)) & m32)
    elif codebook == "mcg":
        values = _mask_xor_half_sum((s * np.uint64(0xCBAC1FED)) & m32)
    elif codebook == "1mad":
        y = _byte_sum((s * np.uint64(34038481) + np.uint64(76625530)) & m32)
        values = (y.astype(np.float32) - np.float32(510)) / np.float32(147.800537109375)
    elif codebook == "mul1":
        y = _byte_sum((s * np.uint64(0x83DCD12D)) & m32).astype(np.float64)
        k_inv = float(np.uint16(0x1EEE).view(np.float16))
        k_bias = float(np.uint16(0xC931).view(np.float16))
        values = ((1024.0 + y) * k_inv + k_bias).astype(np.float16).astype(np.float32)
    else:
        raise ValueError(f"unknown trellis codebook {codebook!r}; choose from {CODEBOOKS}")
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def codebook_rms(codebook: str) -> float:
    return codebook_values(codebook).double().square().mean().sqrt().item()


def check_bits(bits: int) -> int:
    if bits not in BITS_RANGE:
        raise ValueError(f"trellis bits must be in 1..8, got {bits}")
    return bits


def stream_states(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """States ``[..., 256]`` (int64) of tile streams ``packed [..., 8*bits]`` (int32 words, MSB first)."""
    if packed.shape[-1] != 8 * bits:
        raise ValueError(f"a {bits}-bit trellis tile has {8 * bits} words, got {packed.shape[-1]}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    stream = (words.unsqueeze(-1) >> torch.arange(31, -1, -1)) & 1  # [..., 8K, 32], MSB first
    stream = stream.reshape(*packed.shape[:-1], TILE_STEPS * bits)
    ends = (torch.arange(TILE_STEPS) + 1) * bits
    window = (ends.unsqueeze(-1) - STATE_BITS + torch.arange(STATE_BITS)) % (TILE_STEPS * bits)  # [256, 16]
    weights = 1 << torch.arange(STATE_BITS - 1, -1, -1)
    return (stream[..., window] * weights).sum(dim=-1)


def pack_states(states: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`stream_states` for a consistent ring of states ``[..., 256]``: step ``t``'s
    ``bits`` new bits (the low bits of ``s_t``) go to stream bits ``[t*bits, (t+1)*bits)``."""
    new_bits = (states.unsqueeze(-1) >> torch.arange(bits - 1, -1, -1)) & 1  # [..., 256, K], MSB first
    stream = new_bits.reshape(*states.shape[:-1], -1, 32)
    words = (stream << torch.arange(31, -1, -1)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def decode_tiles(packed: torch.Tensor, bits: int, codebook: str) -> torch.Tensor:
    """float32 values ``[..., 256]`` of tile streams ``[..., 8*bits]``."""
    return codebook_values(codebook)[stream_states(packed, bits)]


def untile(tiles: torch.Tensor) -> torch.Tensor:
    """``[N/16, K/16, 256]`` tiles (row-major steps) -> the ``[N, K]`` matrix."""
    n_t, k_t, _ = tiles.shape
    return tiles.reshape(n_t, k_t, TILE, TILE).permute(0, 2, 1, 3).reshape(n_t * TILE, k_t * TILE)


def tile(matrix: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[N/16, K/16, 256]`` tiles with row-major steps (inverse of :func:`untile`)."""
    n, k = matrix.shape
    return matrix.reshape(n // TILE, TILE, k // TILE, TILE).permute(0, 2, 1, 3).reshape(n // TILE, k // TILE, -1)


@dataclass(eq=False)
class TrellisWeight(QuantizedWeight):
    """A trellis-coded ``[N, K_in]`` weight: ``W = diag(sv) H_out Q H_in diag(su)``."""

    format: TrellisFormat
    shape: tuple[int, ...]
    trellis: torch.Tensor  # int32 [N/16, K_in/16, 8*bits]
    su: torch.Tensor  # float16 [K_in]
    sv: torch.Tensor  # float16 [N]
    bits: int
    codebook: str
    had_in: int
    had_out: int

    def decoded(self) -> torch.Tensor:
        """``Q [N, K_in]``: the decoded trellis values (float32)."""
        return untile(decode_tiles(self.trellis, self.bits, self.codebook))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.decoded().double()
        right = hadamard_transform(q, self.had_in)  # Q H_in
        both = hadamard_transform(right.T, self.had_out).T  # H_out Q H_in
        return (self.sv.double().unsqueeze(1) * both * self.su.double().unsqueeze(0)).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"trellis": self.trellis, "su": self.su, "sv": self.sv}

    def settings(self) -> dict[str, int | str]:
        return {"bits": self.bits, "codebook": self.codebook, "had_in": self.had_in, "had_out": self.had_out}


class TrellisFormat:
    """Registry row for trellis codes; bits (1..8) and codebook are per tensor."""

    name = "trellis"
    bits = None
    tensor_names = ("trellis", "su", "sv")

    def __repr__(self) -> str:
        return "<format trellis: 1-8 bits, 16x16 tiles, L=16>"


TRELLIS = TrellisFormat()
