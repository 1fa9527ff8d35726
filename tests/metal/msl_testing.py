"""What the Metal test modules share: the shader directory, the rounding units their tolerances are
stated in, and paged KV-cache inputs for the attention kernels."""

from pathlib import Path

import torch

SHADERS = Path(__file__).resolve().parents[2] / "shaders"

UNIT_ROUNDOFF_F32 = 2.0**-24
UNIT_ROUNDOFF_F16 = 2.0**-11
HALF_SUBNORMAL_SPACING = 2.0**-24


def paged(rows: list[torch.Tensor], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence rows [len, ...] scattered over a block pool in random block order: (pool NaN except
    the rows, int32 block table; unused table entries point past the pool)."""
    needed = [-(-len(r) // block_size) for r in rows]
    num_blocks = sum(needed) + 1
    table = torch.full((len(rows), max(needed) + 1), num_blocks, dtype=torch.int32)
    pool = torch.full((num_blocks, block_size, *rows[0].shape[1:]), float("nan"), dtype=rows[0].dtype)
    blocks = iter(torch.randperm(num_blocks).tolist())
    for seq, seq_rows in enumerate(rows):
        for i in range(needed[seq]):
            block = next(blocks)
            table[seq, i] = block
            chunk = seq_rows[i * block_size:(i + 1) * block_size]
            pool[block, :len(chunk)] = chunk
    return pool, table
