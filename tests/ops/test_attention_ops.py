"""The attention ops (``metal_marlin::paged_attention_decode``, ``mla_attention_decode``,
``flash_attention_prefill``; their references on CPU) against a float64 numpy oracle that loops over
sequences, heads and positions and never sees a block table.

Paged caches are filled the way a server fills them: each sequence's rows are scattered into a pool of
blocks through a shuffled table; pool rows no sequence owns are NaN and unused table entries point one
block past the pool, so an op that reads anything it should not returns NaN or raises.

Tolerance: oracle and op see the same rounded inputs; the op computes in float32 (relative error
~1e-6 here) and rounds the output to the input dtype once: rtol = that dtype's unit roundoff + 1e-5,
atol = 1e-5 (outputs are averages of values in [-1, 1]). Attending to one position too many or too
few moves an output by ~1/context >= 1e-2.
"""

import math
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import metal_marlin  # noqa: F401  (registers the ops)

PAGED = torch.ops.metal_marlin.paged_attention_decode
MLA = torch.ops.metal_marlin.mla_attention_decode
PREFILL = torch.ops.metal_marlin.flash_attention_prefill

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# A decode batch: one position, several blocks plus a remainder, an idle slot (zeros), an exact
# multiple of the block sizes.
CONTEXT_LENS = [1, 37, 0, 83, 64]


def assert_close(out: torch.Tensor, oracle: np.ndarray, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), torch.from_numpy(oracle), rtol=UNIT_ROUNDOFF[dtype] + 1e-5, atol=1e-5)


def oracle_attend(query: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """One head: softmax(scale * keys @ query) @ values over the given rows, float64; zeros without rows."""
    if len(keys) == 0:
        return np.zeros(values.shape[-1])
    scores = [scale * float(np.dot(query, key)) for key in keys]
    top = max(scores)
    weights = np.array([math.exp(s - top) for s in scores])
    return (weights / weights.sum()) @ values


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def paged_pools(row_sets: list[list[torch.Tensor]], block_size: int, spare_blocks: int = 2
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pools [num_blocks, block_size, *row shape] (NaN except the rows), one per row set, sharing one
    shuffled int32 block table (unused entries: num_blocks)."""
    lengths = [len(r) for r in row_sets[0]]
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + spare_blocks
    order = torch.randperm(num_blocks).tolist()
    table = torch.full((len(lengths), max(needed) + 1), num_blocks, dtype=torch.int32)
    for seq, count in enumerate(needed):
        table[seq, :count] = torch.tensor([order.pop() for _ in range(count)])
    pools = []
    for rows in row_sets:
        pool = torch.full((num_blocks, block_size, *rows[0].shape[1:]), float("nan"), dtype=rows[0].dtype)
        for seq, seq_rows in enumerate(rows):
            pos = torch.arange(len(seq_rows))
            pool[table[seq, pos // block_size].long(), pos % block_size] = seq_rows
        pools.append(pool)
    return pools, table


def gqa_case(dtype, head_dim, num_kv_heads, group, block_size):
    num_heads = num_kv_heads * group
    q = (2 * torch.randn(len(CONTEXT_LENS), num_heads, head_dim)).to(dtype)
    keys = [torch.randn(n, num_kv_heads, head_dim).to(dtype) for n in CONTEXT_LENS]
    values = [(2 * torch.rand(n, num_kv_heads, head_dim) - 1).to(dtype) for n in CONTEXT_LENS]
    (k_cache, v_cache), table = paged_pools([keys, values], block_size)
    return q, keys, values, k_cache, v_cache, table, torch.tensor(CONTEXT_LENS, dtype=torch.int32)


def gqa_oracle(q, keys, values, scale):
    group = q.shape[1] // keys[0].shape[1]
    return np.stack([
        np.stack([oracle_attend(f64(q[s, h]), f64(keys[s][:, h // group]), f64(values[s][:, h // group]), scale)
                  for h in range(q.shape[1])])
        for s in range(q.shape[0])
    ])


# ---- paged GQA decode -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, num_kv_heads, group, block_size", [(64, 2, 3, 16), (40, 1, 6, 32), (128, 4, 1, 7)])
def test_paged_attention_decode(dtype, head_dim, num_kv_heads, group, block_size):
    q, keys, values, k_cache, v_cache, table, lens = gqa_case(dtype, head_dim, num_kv_heads, group, block_size)
    scale = head_dim**-0.5
    out = PAGED(q, k_cache, v_cache, table, lens, scale)
    assert_close(out, gqa_oracle(q, keys, values, scale), dtype)
    assert (out[CONTEXT_LENS.index(0)] == 0).all()


def test_paged_attention_decode_of_a_contiguous_cache_is_sdpa():
    """A preallocated [batch, max_len] cache is the paged one with one block per sequence."""
    batch, heads, kv_heads, max_len, head_dim = 3, 8, 2, 20, 32
    q = torch.randn(batch, heads, head_dim)
    k_cache, v_cache = torch.randn(batch, max_len, kv_heads, head_dim), torch.randn(batch, max_len, kv_heads, head_dim)
    lens = torch.tensor([20, 5, 13], dtype=torch.int32)
    out = PAGED(q, k_cache, v_cache, torch.arange(batch, dtype=torch.int32).unsqueeze(1), lens, 0.3)
    for b, n in enumerate(lens.tolist()):
        ref = F.scaled_dot_product_attention(q[b].unsqueeze(1), k_cache[b, :n].transpose(0, 1),
                                             v_cache[b, :n].transpose(0, 1), scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out[b], ref.squeeze(1), rtol=1e-5, atol=1e-6)


# ---- paged MLA decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, rope, num_heads, block_size", [(64, 16, 11, 16), (32, 8, 3, 32)])
def test_mla_attention_decode(dtype, rank, rope, num_heads, block_size):
    scale = 0.1
    q_latent = (0.3 * torch.randn(len(CONTEXT_LENS), num_heads, rank)).to(dtype)
    q_rope = (0.3 * torch.randn(len(CONTEXT_LENS), num_heads, rope)).to(dtype)
    rows = [torch.cat([2 * torch.rand(n, rank) - 1, torch.randn(n, rope)], dim=1).to(dtype) for n in CONTEXT_LENS]
    (cache,), table = paged_pools([rows], block_size)
    out = MLA(q_latent, q_rope, cache, table, torch.tensor(CONTEXT_LENS, dtype=torch.int32), scale)
    query = torch.cat([q_latent, q_rope], dim=-1)
    oracle = np.stack([
        np.stack([oracle_attend(f64(query[s, h]), f64(rows[s]), f64(rows[s][:, :rank]), scale)
                  for h in range(num_heads)])
        for s in range(len(CONTEXT_LENS))
    ])
    assert_close(out, oracle, dtype)


# ---- causal prefill ----------------------------------------------------------------------------------------

# (q_len, kv_len, causal_offset): a plain causal prompt; a continuation of a 37-token cached prefix;
# one query at the end of its context; keys past every query's reach; queries past the last key.
PREFILL_CASES = [(37, 37, 0), (13, 50, 37), (1, 29, 28), (20, 45, 9), (10, 5, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len, kv_len, causal_offset", PREFILL_CASES)
def test_flash_attention_prefill(dtype, q_len, kv_len, causal_offset):
    batch, num_heads, num_kv_heads, head_dim = 2, 6, 2, 24
    scale = head_dim**-0.5
    q = (2 * torch.randn(batch, q_len, num_heads, head_dim)).to(dtype)
    k = torch.randn(batch, kv_len, num_kv_heads, head_dim).to(dtype)
    v = (2 * torch.rand(batch, kv_len, num_kv_heads, head_dim) - 1).to(dtype)
    out = PREFILL(q, k, v, causal_offset, scale)
    group = num_heads // num_kv_heads
    oracle = np.zeros((batch, q_len, num_heads, head_dim))
    for b in range(batch):
        for i in range(q_len):
            seen = min(causal_offset + i + 1, kv_len)
            for h in range(num_heads):
                oracle[b, i, h] = oracle_attend(f64(q[b, i, h]), f64(k[b, :seen, h // group]),
                                                f64(v[b, :seen, h // group]), scale)
    assert_close(out, oracle, dtype)


def test_flash_attention_prefill_without_keys_gives_zeros():
    out = PREFILL(torch.randn(1, 3, 2, 8), torch.randn(1, 0, 1, 8), torch.randn(1, 0, 1, 8), 0, 1.0)
    assert out.shape == (1, 3, 2, 8) and (out == 0).all()


# ---- op registration: schema, fake kernels, compile ----------------------------------------------------

def small_args():
    q, _, _, k_cache, v_cache, table, lens = gqa_case(torch.float32, 16, 2, 2, 8)
    rows = [torch.randn(n, 24) for n in CONTEXT_LENS]
    (cache,), mla_table = paged_pools([rows], 8)
    return {
        "paged": (PAGED, (q, k_cache, v_cache, table, lens, 0.25)),
        "mla": (MLA, (torch.randn(5, 3, 16), torch.randn(5, 3, 8), cache, mla_table, lens, 0.25)),
        "prefill": (PREFILL, (torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16), 2, 0.25)),
    }


@pytest.mark.parametrize("name", ["paged", "mla", "prefill"])
def test_opcheck(name):
    op, args = small_args()[name]
    torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", ["paged", "mla", "prefill"])
def test_meta_tensors_give_the_output_shape(name):
    op, args = small_args()[name]
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert op(*meta).shape == args[0].shape


# ---- bad inputs: every error names the argument ---------------------------------------------------------

def _replace(args, index, value):
    return (*args[:index], value, *args[index + 1:])


def paged_bad_cases():
    q, _, _, k_cache, v_cache, table, lens = gqa_case(torch.float32, 16, 2, 2, 8)
    args = (q, k_cache, v_cache, table, lens, 0.25)
    bad_table = table.clone()
    bad_table[1, 0] = k_cache.shape[0]
    return [
        (_replace(args, 0, q.int()), TypeError, "q must be float32"),
        (_replace(args, 0, q[0]), ValueError, "q must be 3-D"),
        (_replace(args, 1, k_cache[..., :8]), ValueError, "k_cache has head_dim 8"),
        (_replace(args, 2, v_cache[:, :4]), ValueError, "v_cache must have k_cache's shape"),
        (_replace(args, 1, k_cache.half()), TypeError, "k_cache must have q's dtype"),
        (_replace(args, 0, q[:, :3]), ValueError, "multiple of k_cache's 2 kv heads"),
        (_replace(args, 3, table.long()), ValueError, "block_table must be int32"),
        (_replace(args, 4, lens[:2]), ValueError, "context_lens must be int32 [batch=5]"),
        (_replace(args, 5, float("nan")), ValueError, "scale must be finite"),
        (_replace(args, 4, lens + 100), ValueError, "context_lens[0] = 101 is outside 0.."),
        (_replace(args, 3, bad_table), ValueError, f"block_table[1, 0] = {k_cache.shape[0]} is not a block"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_paged_attention_decode_bad_inputs(case):
    args, error, message = paged_bad_cases()[case]
    with pytest.raises(error, match="^paged_attention_decode: .*" + re.escape(message)):
        PAGED(*args)


def mla_bad_cases():
    lens = torch.tensor([3, 9], dtype=torch.int32)
    rows = [torch.randn(n, 24) for n in lens.tolist()]
    (cache,), table = paged_pools([rows], 4)
    args = (torch.randn(2, 3, 16), torch.randn(2, 3, 8), cache, table, lens, 0.25)
    return [
        (_replace(args, 0, args[0].int()), TypeError, "q_latent must be float32"),
        (_replace(args, 1, args[1][:1]), ValueError, "q_rope must have q_latent's"),
        (_replace(args, 2, cache[..., :20]), ValueError, "cache rows must hold rank + rope_dim = 24"),
        (_replace(args, 2, cache.double()), TypeError, "cache must be float32"),
        (_replace(args, 3, table[:1]), ValueError, "block_table must be int32 [batch=2"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_mla_attention_decode_bad_inputs(case):
    args, error, message = mla_bad_cases()[case]
    with pytest.raises(error, match="^mla_attention_decode: .*" + re.escape(message)):
        MLA(*args)


def prefill_bad_cases():
    args = (torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16), 2, 0.25)
    return [
        (_replace(args, 0, args[0][0]), ValueError, "q must be 4-D"),
        (_replace(args, 1, args[1][..., :8]), ValueError, "k must be [batch=2, kv_len, num_kv_heads, head_dim=16]"),
        (_replace(args, 2, args[2][:, :3]), ValueError, "v must have k's shape"),
        (_replace(args, 0, torch.randn(2, 5, 3, 16)), ValueError, "q's 3 heads must be a multiple of k's 2 kv heads"),
        (_replace(args, 3, -1), ValueError, "causal_offset must be >= 0"),
        (_replace(args, 2, args[2].half()), TypeError, "v must have q's dtype"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_flash_attention_prefill_bad_inputs(case):
    args, error, message = prefill_bad_cases()[case]
    with pytest.raises(error, match="^flash_attention_prefill: .*" + re.escape(message)):
        PREFILL(*args)

