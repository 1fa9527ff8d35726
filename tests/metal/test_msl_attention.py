"""shaders/attention.metal in the MSL simulator: paged GQA decode, paged MLA decode (absorbed form) and
causal flash-attention prefill, against float64 torch attention written here.

Paged caches are built the way a server fills them: each sequence's rows are scattered into a pool of
blocks through a shuffled block table; every pool row that no sequence owns (spare blocks, the tail of
a sequence's last block) is NaN and every unused table entry points one block past the pool, so a
kernel that reads a position >= context_len yields NaN or faults at the simulator's guard page. The
references use the per-sequence rows directly and never see the table.

Tolerance: both sides attend over the same half inputs. The kernel's scores, probabilities and sums
are float (relative error ~1e-6 at these sizes), its output is rounded to half once: |error| <=
2^-11 |ref| (RTOL) plus an absolute budget ATOL = 2^-10 for values in [-1, 1], which also covers a
GPU that rounds the probabilities to half inside the matrix unit (|d out| <= 2 * 2^-11 * max|v|).
Attending to one position too many or too few moves an output by ~1/context >= 1e-2.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tests.mslsim import compile_metal

SHADER = Path(__file__).resolve().parents[2] / "shaders" / "attention.metal"

GQA_DECODE_KERNELS = {"paged_gqa_decode_d64": 64, "paged_gqa_decode_d128": 128}
MLA_DECODE_KERNELS = {"paged_mla_decode_r512_p64": (512, 64), "paged_mla_decode_r64_p16": (64, 16)}
PREFILL_KERNELS = {"flash_prefill_d64": 64, "flash_prefill_d128": 128}
KERNELS = [*GQA_DECODE_KERNELS, *MLA_DECODE_KERNELS, *PREFILL_KERNELS]

# Launch geometry and parameter structs of shaders/attention.h.
GQA_DECODE_HEADS, GQA_DECODE_THREADS = 4, 256
MLA_DECODE_HEADS, MLA_DECODE_THREADS = 8, 128
FLASH_PREFILL_BQ, FLASH_PREFILL_THREADS = 32, 128
PAGED_PARAMS = np.dtype([("num_heads", np.uint32), ("num_kv_heads", np.uint32), ("block_size", np.uint32),
                         ("max_blocks", np.uint32), ("scale", np.float32)])
MLA_PARAMS = np.dtype([("num_heads", np.uint32), ("block_size", np.uint32), ("max_blocks", np.uint32),
                       ("scale", np.float32)])
FLASH_PARAMS = np.dtype([("q_len", np.uint32), ("kv_len", np.uint32), ("num_heads", np.uint32),
                         ("num_kv_heads", np.uint32), ("causal_offset", np.uint32), ("scale", np.float32)])

RTOL, ATOL = 2.0**-11, 2.0**-10

# Context lengths of a decode batch: 1, 0 (an idle slot: zeros), one and several blocks plus a
# remainder, and an exact multiple of the block sizes 16 and 32.
CONTEXT_LENS = [1, 37, 0, 83, 64]
# The block size is a runtime parameter: the usual 16 and 32, and 5, whose blocks split the MLA
# kernel's 8-position steps.
BLOCK_SIZES = [16, 32, 5]


@pytest.fixture(scope="module")
def lib():
    return compile_metal(SHADER)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def params(dtype: np.dtype, **fields) -> np.void:
    return np.array([tuple(fields[name] for name in dtype.names)], dtype)[0]


def test_every_kernel_is_instantiated(lib) -> None:
    assert sorted(lib.kernel_names) == sorted(KERNELS)


def random_block_table(context_lens: list[int], block_size: int, spare_blocks: int = 3) -> tuple[torch.Tensor, int]:
    """A shuffled assignment of pool blocks to sequences: int32 [batch, max_blocks] (one column more
    than the longest sequence needs; unused entries hold num_blocks, one past the pool) and the pool
    size (the blocks in use plus spares that no sequence owns)."""
    needed = [cdiv(n, block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks)
    table = torch.full((len(context_lens), max(needed) + 1), num_blocks, dtype=torch.int32)
    start = 0
    for seq, count in enumerate(needed):
        table[seq, :count] = order[start:start + count].int()
        start += count
    return table, num_blocks


def scatter_to_pool(rows: list[torch.Tensor], table: torch.Tensor, block_size: int, num_blocks: int) -> torch.Tensor:
    """The pool [num_blocks, block_size, *row shape] half holding sequence s's row i at block
    table[s, i // block_size], slot i % block_size; NaN everywhere else."""
    pool = torch.full((num_blocks, block_size, *rows[0].shape[1:]), float("nan"), dtype=torch.float16)
    for seq, seq_rows in enumerate(rows):
        pos = torch.arange(seq_rows.shape[0])
        pool[table[seq, pos // block_size].long(), pos % block_size] = seq_rows
    return pool


def attend(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per head: softmax(scores [heads, n]) @ values [heads, n, d] in float64; zeros when n = 0."""
    if scores.shape[-1] == 0:
        return torch.zeros(scores.shape[0], values.shape[-1], dtype=torch.float64)
    return torch.einsum("hn,hnd->hd", scores.double().softmax(-1), values.double())


def assert_attention_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out.double(), ref, rtol=RTOL, atol=ATOL)


# ---- paged GQA decode ----------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads, group", [(2, 3), (1, 6)])  # 6 heads of a group span two threadgroups
@pytest.mark.parametrize("kernel", list(GQA_DECODE_KERNELS))
def test_paged_gqa_decode(lib, kernel: str, num_kv_heads: int, group: int, block_size: int) -> None:
    head_dim = GQA_DECODE_KERNELS[kernel]
    num_heads, batch = num_kv_heads * group, len(CONTEXT_LENS)
    scale = head_dim**-0.5
    q = (2 * torch.randn(batch, num_heads, head_dim)).half()
    keys = [torch.randn(n, num_kv_heads, head_dim).half() for n in CONTEXT_LENS]
    values = [(2 * torch.rand(n, num_kv_heads, head_dim) - 1).half() for n in CONTEXT_LENS]
    table, num_blocks = random_block_table(CONTEXT_LENS, block_size)
    k_cache = scatter_to_pool(keys, table, block_size, num_blocks)
    v_cache = scatter_to_pool(values, table, block_size, num_blocks)
    out = torch.full((batch, num_heads, head_dim), float("nan"), dtype=torch.float16)

    lib.run(kernel, grid=(cdiv(group, GQA_DECODE_HEADS), num_kv_heads, batch), threadgroup=(GQA_DECODE_THREADS, 1, 1),
            buffers={0: q, 1: k_cache, 2: v_cache, 3: table, 4: torch.tensor(CONTEXT_LENS, dtype=torch.int32),
                     5: out, 6: params(PAGED_PARAMS, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       block_size=block_size, max_blocks=table.shape[1], scale=scale)})

    ref = torch.stack([
        attend(torch.einsum("hd,nhd->hn", q[s].double(), keys[s].double().repeat_interleave(group, dim=1)) * scale,
               values[s].double().repeat_interleave(group, dim=1).transpose(0, 1))
        for s in range(batch)
    ])
    assert_attention_close(out, ref)


# ---- paged MLA decode (absorbed form) ------------------------------------------------------------

@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kernel", list(MLA_DECODE_KERNELS))
def test_paged_mla_decode(lib, kernel: str, block_size: int) -> None:
    """GLM-4.7-Flash's 20 heads for the full-size cache, 11 for the small one: both leave a partial
    8-head tile. The latent is RMS-normed in the model; uniform [-1, 1] entries stand in for it."""
    rank, rope = MLA_DECODE_KERNELS[kernel]
    num_heads = 20 if rank == 512 else 11
    batch = len(CONTEXT_LENS)
    scale = 192**-0.5  # GLM-4.7-Flash: (qk_nope 128 + rope 64)^-0.5
    # Query magnitude chosen so the scores have a standard deviation of about 2.
    q_std = 2 / (scale * (rank / 3 + rope) ** 0.5)
    q_latent = (q_std * torch.randn(batch, num_heads, rank)).half()
    q_rope = (q_std * torch.randn(batch, num_heads, rope)).half()
    entries = [torch.cat([2 * torch.rand(n, rank) - 1, torch.randn(n, rope)], dim=1).half() for n in CONTEXT_LENS]
    table, num_blocks = random_block_table(CONTEXT_LENS, block_size)
    cache = scatter_to_pool(entries, table, block_size, num_blocks)
    out = torch.full((batch, num_heads, rank), float("nan"), dtype=torch.float16)

    lib.run(kernel, grid=(cdiv(num_heads, MLA_DECODE_HEADS), batch, 1), threadgroup=(MLA_DECODE_THREADS, 1, 1),
            buffers={0: q_latent, 1: q_rope, 2: cache, 3: table, 4: torch.tensor(CONTEXT_LENS, dtype=torch.int32),
                     5: out, 6: params(MLA_PARAMS, num_heads=num_heads, block_size=block_size,
                                       max_blocks=table.shape[1], scale=scale)})

    ref = []
    for s in range(batch):
        latent, k_rope = entries[s].double().split([rank, rope], dim=1)
        scores = (q_latent[s].double() @ latent.T + q_rope[s].double() @ k_rope.T) * scale
        ref.append(attend(scores, latent.expand(num_heads, -1, -1)))
    assert_attention_close(out, torch.stack(ref))


# ---- causal flash-attention prefill ----------------------------------------------------------------

# (q_len, kv_len, causal_offset): a plain causal prompt over two query tiles; a continuation of a
# 37-token cached prefix; one query at the end of its context; keys past every query's reach.
PREFILL_CASES = [(37, 37, 0), (13, 50, 37), (1, 29, 28), (20, 45, 9)]


@pytest.mark.parametrize("q_len, kv_len, causal_offset", PREFILL_CASES)
@pytest.mark.parametrize("kernel", list(PREFILL_KERNELS))
def test_flash_prefill(lib, kernel: str, q_len: int, kv_len: int, causal_offset: int) -> None:
    head_dim = PREFILL_KERNELS[kernel]
    batch, num_heads, num_kv_heads = 2, 6, 2
    scale = head_dim**-0.5
    q = (2 * torch.randn(batch, q_len, num_heads, head_dim)).half()
    k = torch.randn(batch, kv_len, num_kv_heads, head_dim).half()
    v = (2 * torch.rand(batch, kv_len, num_kv_heads, head_dim) - 1).half()
    out = torch.full((batch, q_len, num_heads, head_dim), float("nan"), dtype=torch.float16)

    lib.run(kernel, grid=(cdiv(q_len, FLASH_PREFILL_BQ), num_heads, batch), threadgroup=(FLASH_PREFILL_THREADS, 1, 1),
            buffers={0: q, 1: k, 2: v, 3: out,
                     4: params(FLASH_PARAMS, q_len=q_len, kv_len=kv_len, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, causal_offset=causal_offset, scale=scale)})

    visible = torch.arange(kv_len).unsqueeze(0) <= causal_offset + torch.arange(q_len).unsqueeze(1)
    ref = F.scaled_dot_product_attention(q.double().transpose(1, 2), k.double().transpose(1, 2),
                                         v.double().transpose(1, 2), attn_mask=visible, scale=scale,
                                         enable_gqa=True)
    assert_attention_close(out, ref.transpose(1, 2))
