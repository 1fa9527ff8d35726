"""Bit packing of unsigned codes into int32 words along the last dimension (docs/formats.md)."""

from __future__ import annotations

import torch

PACK_BLOCK = 32  # codes per packing block; every format's K must be a multiple of it


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` codes of ``bits`` bits."""
    return k * bits // 32


# Words are little-endian, so a word's bytes in memory order hold its codes from bit 0 upwards: packing
# works on bytes and reinterprets them as int32 (torch runs only on little-endian hosts).


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes (bits in 1, 2, 4, 8), ``32 // bits`` per word, low bits first."""
    per_byte = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    packed_bytes = c[..., 0].clone()
    for i in range(1, per_byte):
        packed_bytes |= c[..., i] << (bits * i)
    return packed_bytes.contiguous().view(torch.int32)


def _unpack_plane(words: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    packed_bytes = words.contiguous().view(torch.uint8)
    shifts = torch.arange(per_byte, dtype=torch.uint8, device=words.device) * bits
    codes = (packed_bytes.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*words.shape[:-1], -1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[..., K]`` (integers in ``0 .. 2**bits - 1``) into int32 words ``[..., K*bits/32]``."""
    k = codes.shape[-1]
    if k % PACK_BLOCK:
        raise ValueError(f"the packed dimension ({k}) must be a multiple of {PACK_BLOCK}")
    if bits in (2, 4, 8):
        return _pack_plane(codes, bits)
    if bits == 3:
        c = codes.to(torch.int64).reshape(*codes.shape[:-1], k // 32, 32)
        lo = _pack_plane(c & 3, 2)  # [..., k/32, 2]: codes 0-15 then 16-31
        hi = _pack_plane(c >> 2, 1)  # [..., k/32, 1]
        return torch.cat([lo, hi], dim=-1).reshape(*codes.shape[:-1], k * 3 // 32)
    raise ValueError(f"no packing for {bits}-bit codes")


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words ``[..., W]`` to uint8 codes ``[..., W*32/bits]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be int32, got {packed.dtype}")
    if bits in (2, 4, 8):
        return _unpack_plane(packed, bits)
    if bits == 3:
        blocks = packed.reshape(*packed.shape[:-1], -1, 3)
        lo = _unpack_plane(blocks[..., :2], 2).reshape(*blocks.shape[:-1], 32)
        hi = _unpack_plane(blocks[..., 2:], 1).reshape(*blocks.shape[:-1], 32)
        return (lo | (hi << 2)).reshape(*packed.shape[:-1], -1)
    raise ValueError(f"no packing for {bits}-bit codes")
