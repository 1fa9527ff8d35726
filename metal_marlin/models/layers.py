"""Blocks shared by every architecture of the runtime: RMSNorm, rotary embeddings, the SwiGLU MLP.

Parameter names follow transformers' modules, so a transformers state dict loads without renaming.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the normalisation computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_frequencies(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale of the config's rotary embedding. The scaling variants
    (llama3, yarn, linear, dynamic, longrope) come from transformers' own table of RoPE initialisers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes frequencies with the sequence length; not supported")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[B, T, dim]`` for integer positions ``[B, T]`` (computed once per forward and
    shared by every layer)."""

    def __init__(self, config) -> None:
        super().__init__()
        inv_freq, self.scale = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [B, heads, T, d]`` with the two halves of the last dimension as the rotated pairs."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_interleaved_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with adjacent elements ``(x0, x1), (x2, x3), ...`` as the pairs (DeepSeek's layout). The
    result is written de-interleaved (all first elements, then all second ones), as transformers does;
    queries and keys get the same permutation, so their dot products are unchanged."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


class SwiGLUMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; the three projections may be any linear-like modules."""

    def __init__(self, hidden: int, intermediate: int, act_fn, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
