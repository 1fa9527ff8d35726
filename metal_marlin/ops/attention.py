"""Attention ops: decode over paged caches and causal prefill (the kernels of shaders/attention.metal).

* ``metal_marlin::paged_attention_decode``: one query token per sequence, grouped-query attention over
  a paged key/value cache.
* ``metal_marlin::mla_attention_decode``: multi-head latent attention (DeepSeek-V3, GLM-4.7-Flash) in
  the absorbed form, one query per sequence, over a paged cache of latents: every head attends to the
  same rows ``[latent, rotated shared key]`` (as ``MLACache`` stores them) and gets the
  softmax-weighted latent; the caller applies ``W_uv``.
* ``metal_marlin::flash_attention_prefill``: causal attention of ``T`` new queries over ``S`` keys of the
  same sequences; query ``i`` sits at position ``causal_offset + i`` and sees keys ``0 ..
  causal_offset + i``.

Paged caches are a pool of blocks of ``block_size`` positions: ``block_table[b, i]`` names the pool
block holding positions ``i * block_size ..`` of sequence ``b`` and ``context_lens[b]`` how many are
valid. Nothing at or past ``context_lens[b]`` is read (it may hold anything, even NaN), nor table
entries past the last block a sequence needs; a context of 0 gives zeros. Query head ``h`` reads
key/value head ``h // (num_heads // num_kv_heads)`` (torch's ``enable_gqa`` order).

Each op is declared once here: the pure-torch reference (float32 math, any device) is the default
implementation and the oracle; the fake kernel gives shapes; on macOS builds the MPS kernel runs the
Metal kernels for float16 tensors of the instantiated head sizes and the reference otherwise.
"""

from __future__ import annotations

import math

import torch

from .. import _core
from . import metal
from .group_matmul import ACTIVATION_DTYPES
from .metal import Launch, ParamsStruct, cdiv

# ---- argument checks (shared by every backend) ----------------------------------------------------


def _check_float(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _check_same(op: str, reference_name: str, reference: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``others`` on ``reference``'s device; the floating ones in its dtype."""
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on {reference.device}")
        if t.is_floating_point() and t.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} must have {reference_name}'s dtype {reference.dtype}, got {t.dtype}")


def _check_scale(op: str, scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def _check_paging(op: str, batch: int, block_table: torch.Tensor, context_lens: torch.Tensor) -> None:
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"{op}: block_table must be int32 [batch={batch}, max_blocks], "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (batch,):
        raise ValueError(f"{op}: context_lens must be int32 [batch={batch}], "
                         f"got {context_lens.dtype} {tuple(context_lens.shape)}")


def check_paged_attention_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> None:
    """Raise a clear error naming the argument for shapes, dtypes or devices no backend can take."""
    op = "paged_attention_decode"
    _check_float(op, "q", q, 3, "[batch, num_heads, head_dim]")
    _check_float(op, "k_cache", k_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]")
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{op}: k_cache has head_dim {k_cache.shape[3]} but q has {head_dim}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{op}: q's {num_heads} heads must be a multiple of k_cache's {num_kv_heads} kv heads")
    _check_paging(op, batch, block_table, context_lens)
    _check_same(op, "q", q, {"k_cache": k_cache, "v_cache": v_cache, "block_table": block_table,
                             "context_lens": context_lens})
    _check_scale(op, scale)


def check_mla_attention_args(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                             block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> None:
    """Raise a clear error naming the argument for shapes, dtypes or devices no backend can take."""
    op = "mla_attention_decode"
    _check_float(op, "q_latent", q_latent, 3, "[batch, num_heads, rank]")
    _check_float(op, "q_rope", q_rope, 3, "[batch, num_heads, rope_dim]")
    _check_float(op, "cache", cache, 3, "[num_blocks, block_size, rank + rope_dim]")
    if q_rope.shape[:2] != q_latent.shape[:2]:
        raise ValueError(f"{op}: q_rope must have q_latent's [batch, num_heads] {tuple(q_latent.shape[:2])}, "
                         f"got {tuple(q_rope.shape[:2])}")
    depth = q_latent.shape[2] + q_rope.shape[2]
    if cache.shape[2] != depth:
        raise ValueError(f"{op}: cache rows must hold rank + rope_dim = {depth} values, got {cache.shape[2]}")
    _check_paging(op, q_latent.shape[0], block_table, context_lens)
    _check_same(op, "q_latent", q_latent, {"q_rope": q_rope, "cache": cache, "block_table": block_table,
                                           "context_lens": context_lens})
    _check_scale(op, scale)


def check_flash_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int,
                               scale: float) -> None:
    """Raise a clear error naming the argument for shapes, dtypes or devices no backend can take."""
    op = "flash_attention_prefill"
    _check_float(op, "q", q, 4, "[batch, q_len, num_heads, head_dim]")
    _check_float(op, "k", k, 4, "[batch, kv_len, num_kv_heads, head_dim]")
    batch, _, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{op}: k must be [batch={batch}, kv_len, num_kv_heads, head_dim={head_dim}], "
                         f"got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[2] == 0 or num_heads % k.shape[2]:
        raise ValueError(f"{op}: q's {num_heads} heads must be a multiple of k's {k.shape[2]} kv heads")
    if causal_offset < 0:
        raise ValueError(f"{op}: causal_offset must be >= 0, got {causal_offset}")
    _check_same(op, "q", q, {"k": k, "v": v})
    _check_scale(op, scale)


def check_block_table(op: str, block_table: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                      block_size: int) -> None:
    """Every context fits its table row and every table entry it needs names a pool block. Reads the
    data (a host sync off the CPU): the references call it, the kernels trust their caller."""
    capacity = block_table.shape[1] * block_size
    bad_len = (context_lens < 0) | (context_lens > capacity)
    if bad_len.any():
        b = int(bad_len.nonzero()[0, 0])
        raise ValueError(f"{op}: context_lens[{b}] = {int(context_lens[b])} is outside 0..{capacity} "
                         f"(max_blocks {block_table.shape[1]} x block_size {block_size})")
    needed = torch.arange(block_table.shape[1], device=block_table.device) * block_size < context_lens.unsqueeze(1)
    bad_entry = needed & ((block_table < 0) | (block_table >= num_blocks))
    if bad_entry.any():
        b, i = (int(j) for j in bad_entry.nonzero()[0])
        raise ValueError(f"{op}: block_table[{b}, {i}] = {int(block_table[b, i])} is not a block of the "
                         f"{num_blocks}-block cache")


# ---- references (pure torch, float32 math, any device) ----------------------------------------------


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's rows ``[batch, max_blocks * block_size, ...]`` (float32, zero where not valid) and
    the valid mask ``[batch, max_blocks * block_size]``."""
    num_blocks, block_size = cache.shape[:2]
    # Entries past a sequence's last block may hold anything: clamp them to a real block, masked below.
    rows = cache[block_table.long().clamp(0, num_blocks - 1)].flatten(1, 2).float()
    positions = torch.arange(rows.shape[1], device=cache.device)
    valid = positions < context_lens.unsqueeze(1)
    rows = torch.where(valid.view(*valid.shape, *([1] * (rows.dim() - 2))), rows, 0.0)  # NaN-safe zeroing
    return rows, valid


def _attend(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor, equation: str) -> torch.Tensor:
    """softmax over the last dimension of ``scores`` restricted to ``visible`` (zeros where nothing is),
    contracted with ``values`` by ``equation``."""
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)
    return torch.einsum(equation, probs, values).contiguous()  # the fake kernels promise contiguous outputs


def reference_paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_table: torch.Tensor, context_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    """``out [batch, num_heads, head_dim]`` (q's dtype) of ``q [batch, num_heads, head_dim]`` over the
    paged ``k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]`` (module docstring)."""
    check_paged_attention_args(q, k_cache, v_cache, block_table, context_lens, scale)
    check_block_table("paged_attention_decode", block_table, context_lens, k_cache.shape[0], k_cache.shape[1])
    group = q.shape[1] // k_cache.shape[2]
    keys, valid = _gather_pages(k_cache, block_table, context_lens)  # [batch, L, kv_heads, head_dim]
    values, _ = _gather_pages(v_cache, block_table, context_lens)
    keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    return _attend(scores, valid.unsqueeze(1), values, "bhl,blhd->bhd").to(q.dtype)


def reference_mla_attention_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                                   block_table: torch.Tensor, context_lens: torch.Tensor,
                                   scale: float) -> torch.Tensor:
    """``out [batch, num_heads, rank]`` (q_latent's dtype): ``softmax(scale * (q_latent . latent + q_rope .
    k_rope)) @ latent`` over the paged ``cache [num_blocks, block_size, rank + rope_dim]``."""
    check_mla_attention_args(q_latent, q_rope, cache, block_table, context_lens, scale)
    check_block_table("mla_attention_decode", block_table, context_lens, cache.shape[0], cache.shape[1])
    rank = q_latent.shape[2]
    rows, valid = _gather_pages(cache, block_table, context_lens)  # [batch, L, rank + rope]
    query = torch.cat([q_latent.float(), q_rope.float()], dim=-1)
    scores = torch.einsum("bhr,blr->bhl", query, rows) * scale
    return _attend(scores, valid.unsqueeze(1), rows[..., :rank], "bhl,blr->bhr").to(q_latent.dtype)


def reference_flash_attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int,
                                      scale: float) -> torch.Tensor:
    """``out [batch, q_len, num_heads, head_dim]`` (q's dtype) of ``q [batch, q_len, num_heads, head_dim]``
    over ``k, v [batch, kv_len, num_kv_heads, head_dim]``, causal (module docstring)."""
    check_flash_attention_args(q, k, v, causal_offset, scale)
    group = q.shape[2] // k.shape[2]
    keys, values = k.float().repeat_interleave(group, dim=2), v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), keys) * scale
    query_pos = causal_offset + torch.arange(q.shape[1], device=q.device)
    visible = torch.arange(k.shape[1], device=q.device) <= query_pos.unsqueeze(1)  # [q_len, kv_len]
    return _attend(scores, visible, values, "bhts,bshd->bthd").to(q.dtype)


# ---- the ops -------------------------------------------------------------------------------------------

paged_attention_decode = torch.library.custom_op("metal_marlin::paged_attention_decode",
                                                 reference_paged_attention_decode, mutates_args=())
mla_attention_decode = torch.library.custom_op("metal_marlin::mla_attention_decode", reference_mla_attention_decode,
                                               mutates_args=())
flash_attention_prefill = torch.library.custom_op("metal_marlin::flash_attention_prefill",
                                                  reference_flash_attention_prefill, mutates_args=())


@paged_attention_decode.register_fake
def _paged_attention_decode_fake(q, k_cache, v_cache, block_table, context_lens, scale):
    check_paged_attention_args(q, k_cache, v_cache, block_table, context_lens, scale)
    return q.new_empty(q.shape)


@mla_attention_decode.register_fake
def _mla_attention_decode_fake(q_latent, q_rope, cache, block_table, context_lens, scale):
    check_mla_attention_args(q_latent, q_rope, cache, block_table, context_lens, scale)
    return q_latent.new_empty(q_latent.shape)


@flash_attention_prefill.register_fake
def _flash_attention_prefill_fake(q, k, v, causal_offset, scale):
    check_flash_attention_args(q, k, v, causal_offset, scale)
    return q.new_empty(q.shape)


# ---- Metal launches (shaders/attention.h) ----------------------------------------------------------------

GQA_DECODE_HEADS, GQA_DECODE_THREADS = 4, 256
MLA_DECODE_HEADS, MLA_DECODE_THREADS = 8, 128
FLASH_PREFILL_BQ, FLASH_PREFILL_THREADS = 32, 128
PagedAttentionParams = ParamsStruct("PagedAttentionParams", (
    ("uint", "num_heads"), ("uint", "num_kv_heads"), ("uint", "block_size"), ("uint", "max_blocks"),
    ("float", "scale")))
PagedMLAParams = ParamsStruct("PagedMLAParams", (
    ("uint", "num_heads"), ("uint", "block_size"), ("uint", "max_blocks"), ("float", "scale")))
FlashAttentionParams = ParamsStruct("FlashAttentionParams", (
    ("uint", "q_len"), ("uint", "kv_len"), ("uint", "num_heads"), ("uint", "num_kv_heads"),
    ("uint", "causal_offset"), ("float", "scale")))

# The instantiations: head dims of the GQA kernels, (rank, rope_dim) of the MLA kernel.
HEAD_DIMS = (64, 128)
MLA_SHAPES = ((512, 64), (64, 16))


def gqa_decode_kernel(head_dim: int) -> str:
    return f"paged_gqa_decode_d{head_dim}"


def mla_decode_kernel(rank: int, rope_dim: int) -> str:
    return f"paged_mla_decode_r{rank}_p{rope_dim}"


def flash_prefill_kernel(head_dim: int) -> str:
    return f"flash_prefill_d{head_dim}"


METAL_KERNELS = (*(gqa_decode_kernel(d) for d in HEAD_DIMS), *(mla_decode_kernel(*s) for s in MLA_SHAPES),
                 *(flash_prefill_kernel(d) for d in HEAD_DIMS))


def paged_attention_decode_launches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    block_table: torch.Tensor, context_lens: torch.Tensor, out: torch.Tensor,
                                    scale: float) -> list[Launch]:
    """``out = paged_attention_decode(...)`` on the GPU: float16 contiguous tensors, head_dim in HEAD_DIMS."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    return [Launch(gqa_decode_kernel(head_dim), (cdiv(group, GQA_DECODE_HEADS), num_kv_heads, batch),
                   (GQA_DECODE_THREADS, 1, 1),
                   {0: q, 1: k_cache, 2: v_cache, 3: block_table, 4: context_lens, 5: out},
                   {6: PagedAttentionParams.pack(num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                 block_size=block_size, max_blocks=block_table.shape[1],
                                                 scale=scale)})]


def mla_attention_decode_launches(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                                  block_table: torch.Tensor, context_lens: torch.Tensor, out: torch.Tensor,
                                  scale: float) -> list[Launch]:
    """``out = mla_attention_decode(...)`` on the GPU: float16 contiguous tensors, (rank, rope) in MLA_SHAPES."""
    batch, num_heads, rank = q_latent.shape
    return [Launch(mla_decode_kernel(rank, q_rope.shape[2]), (cdiv(num_heads, MLA_DECODE_HEADS), batch, 1),
                   (MLA_DECODE_THREADS, 1, 1),
                   {0: q_latent, 1: q_rope, 2: cache, 3: block_table, 4: context_lens, 5: out},
                   {6: PagedMLAParams.pack(num_heads=num_heads, block_size=cache.shape[1],
                                           max_blocks=block_table.shape[1], scale=scale)})]


def flash_attention_prefill_launches(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                     causal_offset: int, scale: float) -> list[Launch]:
    """``out = flash_attention_prefill(...)`` on the GPU: float16 contiguous tensors, head_dim in HEAD_DIMS."""
    batch, q_len, num_heads, head_dim = q.shape
    return [Launch(flash_prefill_kernel(head_dim), (cdiv(q_len, FLASH_PREFILL_BQ), num_heads, batch),
                   (FLASH_PREFILL_THREADS, 1, 1), {0: q, 1: k, 2: v, 3: out},
                   {4: FlashAttentionParams.pack(q_len=q_len, kv_len=k.shape[1], num_heads=num_heads,
                                                 num_kv_heads=k.shape[2], causal_offset=causal_offset,
                                                 scale=scale)})]


def paged_attention_decode_metal(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``): the
    Metal kernel for float16 and head_dim in HEAD_DIMS, the reference otherwise."""
    check_paged_attention_args(q, k_cache, v_cache, block_table, context_lens, scale)
    if q.dtype != torch.float16 or q.shape[2] not in HEAD_DIMS:
        return reference_paged_attention_decode(q, k_cache, v_cache, block_table, context_lens, scale)
    out = torch.empty(q.shape, dtype=torch.float16, device=q.device)
    if out.numel():
        half, index = torch.float16, torch.int32
        metal.dispatch(paged_attention_decode_launches(
            metal.metal_input(q, half), metal.metal_input(k_cache, half), metal.metal_input(v_cache, half),
            metal.metal_input(block_table, index), metal.metal_input(context_lens, index), out, scale))
    return out


def mla_attention_decode_metal(q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor,
                               block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``): the
    Metal kernel for float16 and (rank, rope_dim) in MLA_SHAPES, the reference otherwise."""
    check_mla_attention_args(q_latent, q_rope, cache, block_table, context_lens, scale)
    if q_latent.dtype != torch.float16 or (q_latent.shape[2], q_rope.shape[2]) not in MLA_SHAPES:
        return reference_mla_attention_decode(q_latent, q_rope, cache, block_table, context_lens, scale)
    out = torch.empty(q_latent.shape, dtype=torch.float16, device=q_latent.device)
    if out.numel():
        half, index = torch.float16, torch.int32
        metal.dispatch(mla_attention_decode_launches(
            metal.metal_input(q_latent, half), metal.metal_input(q_rope, half), metal.metal_input(cache, half),
            metal.metal_input(block_table, index), metal.metal_input(context_lens, index), out, scale))
    return out


def flash_attention_prefill_metal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int,
                                  scale: float) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``): the
    Metal kernel for float16 and head_dim in HEAD_DIMS, the reference otherwise."""
    check_flash_attention_args(q, k, v, causal_offset, scale)
    if q.dtype != torch.float16 or q.shape[3] not in HEAD_DIMS:
        return reference_flash_attention_prefill(q, k, v, causal_offset, scale)
    out = torch.empty(q.shape, dtype=torch.float16, device=q.device)
    if k.shape[1] == 0:
        return out.zero_()  # no key to attend to
    if out.numel():
        half = torch.float16
        metal.dispatch(flash_attention_prefill_launches(
            metal.metal_input(q, half), metal.metal_input(k, half), metal.metal_input(v, half), out,
            causal_offset, scale))
    return out


if _core.has_metal():
    paged_attention_decode.register_kernel("mps")(paged_attention_decode_metal)
    mla_attention_decode.register_kernel("mps")(mla_attention_decode_metal)
    flash_attention_prefill.register_kernel("mps")(flash_attention_prefill_metal)
