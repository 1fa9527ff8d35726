"""Preallocated KV caches: per-head keys/values for GQA, the compressed latent for MLA.

Both hold ``max_len`` positions per sequence, allocated once; a forward writes its ``T`` new positions
at ``length`` and attends over ``[0, length + T)``. ``key_mask`` marks which positions hold real tokens
(left padding of a batch is masked out), and ``seen`` counts each row's real tokens, which gives the
rotary position of the next one. The host-side ``length`` is known without reading the device.
"""

from __future__ import annotations

import torch


class CacheState:
    """Bookkeeping shared by both caches."""

    decodes_paged = False  # see PagedStep: attention through the paged decode ops

    def __init__(self, batch: int, max_len: int, device: torch.device | str) -> None:
        self.batch, self.max_len = batch, max_len
        self.length = 0
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)

    def begin(self, step_mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Record a step of ``T`` positions (``step_mask [B, T]``: real tokens); returns the write offset
        and the rotary positions ``[B, T]`` of the new tokens."""
        steps = step_mask.shape[1]
        if step_mask.shape[0] != self.batch:
            raise ValueError(f"the cache holds {self.batch} sequences, the input has {step_mask.shape[0]}")
        if self.length + steps > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} are used and "
                             f"{steps} more were given")
        start = self.length
        self.key_mask[:, start:start + steps] = step_mask
        positions = self.seen.unsqueeze(1) + step_mask.long().cumsum(1) - 1
        return start, positions.clamp_min(0)

    def end(self, step_mask: torch.Tensor) -> None:
        self.length += step_mask.shape[1]
        self.seen += step_mask.long().sum(1)

    def attention_mask(self, start: int, steps: int) -> torch.Tensor:
        """``[B, 1, T, S]`` booleans (True: attend): causal, real keys only, and each query always sees
        itself, so a padding query has a finite softmax (its output is never used)."""
        total = start + steps
        device = self.key_mask.device
        query_pos = torch.arange(start, total, device=device)
        key_pos = torch.arange(total, device=device)
        causal = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)
        allowed = causal.unsqueeze(0) & self.key_mask[:, :total].unsqueeze(1)
        allowed |= key_pos.unsqueeze(0) == query_pos.unsqueeze(1)
        return allowed.unsqueeze(1)


class KVCache(CacheState):
    """Keys and values ``[layers, B, kv_heads, max_len, head_dim]``."""

    def __init__(self, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(batch, max_len, device)
        self.keys = torch.zeros(layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(layers, batch, kv_heads, max_len, v_head_dim, dtype=dtype, device=device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, kv_heads, T, d]`` at ``start``; returns the layer's keys and values so far."""
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def bytes_per_token(self) -> int:
        per_layer = self.keys[0, 0, :, 0].numel() + self.values[0, 0, :, 0].numel()
        return per_layer * self.keys.shape[0] * self.keys.element_size()


class MLACache(CacheState):
    """MLA's compressed kv: per token and layer the normalised latent (``kv_lora_rank``) and the rotated
    shared key (``qk_rope_head_dim``), stored side by side as ``[layers, B, max_len, rank + rope]``.
    Attention runs in the absorbed form directly on it (``MLAAttention``); per-head keys and values are
    never built."""

    def __init__(self, layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(batch, max_len, device)
        self.kv_lora_rank = kv_lora_rank
        self.entries = torch.zeros(layers, batch, max_len, kv_lora_rank + rope_dim, dtype=dtype, device=device)

    def write(self, layer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Store ``latent [B, T, rank]`` and ``k_rope [B, T, rope]``; returns the layer's entries so far."""
        end = start + latent.shape[1]
        self.entries[layer, :, start:end, :self.kv_lora_rank] = latent
        self.entries[layer, :, start:end, self.kv_lora_rank:] = k_rope
        return self.entries[layer, :, :end]

    def bytes_per_token(self) -> int:
        return self.entries.shape[0] * self.entries.shape[-1] * self.entries.element_size()
