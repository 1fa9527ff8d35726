"""Attention blocks: grouped-query attention (llama, qwen2/3) and multi-head latent attention (MLA:
DeepSeek-V3, GLM-4.7-Flash) in the absorbed form over the latent cache."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .cache import KVCache, MLACache
from .layers import RMSNorm, rotate_half_pairs, rotate_interleaved_pairs
from .paged_cache import PagedStep

# transformers builds MLA's two latent norms with the RMSNorm default, not config.rms_norm_eps.
MLA_LATENT_NORM_EPS = 1e-6


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float weight ``[out, in]`` of a linear-like module (dequantized if it is quantized)."""
    weight = getattr(module, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) else module.dequantize_weight()


class GQAAttention(nn.Module):
    """Multi-head attention with ``num_key_value_heads`` shared key/value heads; optional per-head
    RMSNorm of queries and keys before RoPE (qwen3)."""

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | PagedStep, start: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.heads, self.head_dim)
        k = self.k_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, steps, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = rotate_half_pairs(q.transpose(1, 2), cos, sin)
        k = rotate_half_pairs(k.transpose(1, 2), cos, sin)
        if cache.decodes_paged:  # one new token per sequence of a paged cache: the paged-attention op
            out = cache.decode_attention(self.layer_idx, q, k, v.transpose(1, 2), self.scaling)
        else:
            keys, values = cache.write(self.layer_idx, start, k, v.transpose(1, 2))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim))


class MLAAttention(nn.Module):
    """Multi-head latent attention. Keys and values are ``kv_b_proj`` applied to a shared per-token latent
    ``c``; the cache keeps only ``c`` and the rotated shared key. Scores use the absorbed form
    ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``, and values ``W_uv (sum_s p_s c_s)``: one attention over
    the latent with a single key/value head, whatever the number of query heads."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.interleaved = getattr(config, "rope_interleave", True)
        hidden, qk_dim = config.hidden_size, self.nope_dim + self.rope_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, MLA_LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, hidden, bias=bias)
        self.scaling = qk_dim**-0.5 * _yarn_mscale_squared(config.rope_parameters)
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk [heads, nope, rank]`` and ``W_uv [heads, v, rank]`` from ``kv_b_proj`` (dequantized once;
        the weights are immutable at inference)."""
        if self._absorbed is None or self._absorbed[0].dtype != dtype:
            w = dense_weight(self.kv_b_proj).to(dtype).view(self.heads, self.nope_dim + self.v_dim, self.rank)
            self._absorbed = (w[:, :self.nope_dim].contiguous(), w[:, self.nope_dim:].contiguous())
        return self._absorbed

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: MLACache | PagedStep, start: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, steps, self.heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        rotate = rotate_interleaved_pairs if self.interleaved else rotate_half_pairs
        cos, sin = rope
        q_rope = rotate(q_rope, cos, sin)
        k_rope = rotate(k_rope.unsqueeze(1), cos, sin).squeeze(1)
        w_uk, w_uv = self.absorbed_weights(x.dtype)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        if cache.decodes_paged:  # one new token per sequence of a paged cache: the paged MLA op
            out = cache.decode_latent_attention(self.layer_idx, latent, k_rope, q_latent, q_rope, self.scaling)
        else:
            entries = cache.write(self.layer_idx, start, latent, k_rope).unsqueeze(1)  # [B, 1, S, rank + rope]
            out = F.scaled_dot_product_attention(torch.cat((q_latent, q_rope), dim=-1), entries,
                                                 entries[..., :self.rank], attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=True)
        out = torch.einsum("bhtr,hvr->bthv", out, w_uv).reshape(batch, steps, self.heads * self.v_dim)
        return self.o_proj(out)


def _yarn_mscale_squared(rope_parameters: dict) -> float:
    """DeepSeek's YaRN attention-scale correction (``mscale_all_dim``), applied to the softmax scale."""
    if rope_parameters.get("rope_type", "default") == "default":
        return 1.0
    mscale_all_dim = rope_parameters.get("mscale_all_dim", 0)
    factor = rope_parameters.get("factor", 1.0)
    if not mscale_all_dim or factor <= 1:
        return 1.0
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale
