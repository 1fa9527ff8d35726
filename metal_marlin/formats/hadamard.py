"""Blockwise normalised Sylvester Hadamard transforms (docs/formats.md, "Hadamard transforms").

Part of the trellis format's definition: a dimension ``n`` is transformed in blocks of the largest
power of two dividing it (capped), so sizes such as 576 = 9 x 64 or 1536 = 12 x 128 need no padding.
This is the dense reference; ``torch.ops.metal_marlin.hadamard`` is the fast transform.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def sylvester(block: int) -> torch.Tensor:
    """``H_b / sqrt(b)`` with ``H_b[i, j] = (-1)^popcount(i & j)`` (float64, symmetric, orthogonal)."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {block}")
    idx = torch.arange(block)
    both = idx.unsqueeze(1) & idx.unsqueeze(0)
    parity = torch.zeros_like(both)
    for bit in range(max(block.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1
    return (1.0 - 2.0 * parity.double()) / block**0.5


def hadamard_block_size(n: int, max_block: int = 128) -> int:
    """The largest power of two dividing ``n`` and at most ``max_block``."""
    if n <= 0 or max_block <= 0:
        raise ValueError(f"dimension and max_block must be positive, got {n}, {max_block}")
    return min(n & -n, 1 << (max_block.bit_length() - 1))


def hadamard_transform(x: torch.Tensor, block: int) -> torch.Tensor:
    """Multiply every block of ``block`` consecutive elements of the last dimension by ``H_b / sqrt(b)``."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"Hadamard block {block} does not divide the dimension {n}")
    h = sylvester(block).to(device=x.device, dtype=x.dtype)
    return (x.reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape)
