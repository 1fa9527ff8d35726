"""The fused CPU decode step: every decoder layer of a one-token step in one C++ call.

A decode step through the Python blocks costs ~25 small torch ops per layer, each with its own dispatch
and allocation; on a 135M-parameter model that overhead outweighs the matmuls. ``_core.DecoderStack``
runs RMSNorm, q/k/v, RoPE, the KV-cache write, attention, o_proj, the SwiGLU MLP and both residuals of
every layer in C++ (``csrc/cpu/decoder_step.h``), with the same GEMV kernels as ``quant_matmul``.

It serves dense GQA models (llama, qwen2, qwen3) whose seven projections are quantized
(``MetalQuantizedLinear`` in any group format, or ``TrellisLinear``), in float32 on the CPU, for steps
of one token per sequence (up to ``MAX_BATCH`` sequences) into a ``KVCache`` or a GQA ``PagedKVCache`` (the
server's decode steps). Everything else goes through the Python blocks, which remain the reference the
tests compare this path with.
"""

from __future__ import annotations

import torch

from .. import _core
from ..nn import MetalQuantizedLinear, TrellisLinear
from .attention import GQAAttention
from .cache import KVCache
from .layers import SwiGLUMLP
from .paged_cache import PagedStep

MAX_BATCH = 8
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def unsupported_reason(model) -> str | None:
    """Why ``model``'s layers cannot run fused (None if they can)."""
    config = model.config
    if model.architecture.attention != "gqa":
        return f"{config.model_type}: attention is not GQA"
    if config.hidden_act not in ("silu", "swish"):
        return f"activation {config.hidden_act!r} is not SiLU"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"the model is {model.dtype} on {model.device}; the fused step is float32 on the CPU"
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.self_attn, GQAAttention) or not isinstance(layer.mlp, SwiGLUMLP):
            return f"layer {i} is not GQA attention + SwiGLU MLP"
        for block, name in PROJECTIONS:
            module = getattr(getattr(layer, block), name)
            if not isinstance(module, MetalQuantizedLinear | TrellisLinear):
                return (f"model.layers.{i}.{block}.{name} is {type(module).__name__}, not MetalQuantizedLinear or "
                        "TrellisLinear")
            if module.bias is not None and module.bias.dtype != torch.float32:
                return f"model.layers.{i}.{block}.{name}: bias is {module.bias.dtype}"
    return None


def build_decoder_stack(model) -> _core.DecoderStack:
    """``_core.DecoderStack`` over ``model``'s current layers (it keeps references to their tensors)."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"the fused decode step cannot run this model: {reason}")
    config = model.config
    attn = model.model.layers[0].self_attn
    stack = _core.DecoderStack(config.hidden_size, attn.heads, attn.kv_heads, attn.head_dim,
                               config.intermediate_size, float(config.rms_norm_eps))
    for i, layer in enumerate(model.model.layers):
        linears = []
        for block, name in PROJECTIONS:
            m = getattr(getattr(layer, block), name)
            qualified = f"model.layers.{i}.{block}.{name}"
            if isinstance(m, TrellisLinear):
                linears.append((qualified, m.trellis, m.su, m.sv, m.bias, "trellis", m.bits, m.codebook, m.had_in,
                                m.had_out))
            else:
                linears.append((qualified, m.packed, m.scales, m.offsets, m.bias, m.format, m.group_size))
        a = layer.self_attn
        stack.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        None if a.q_norm is None else a.q_norm.weight.detach(),
                        None if a.k_norm is None else a.k_norm.weight.detach(), linears)
    return stack


def runs_fused(cache, batch: int, steps: int) -> bool:
    """Whether a forward of ``steps`` tokens for ``batch`` sequences into ``cache`` has the fused step's
    shape: one token per sequence, a ``KVCache`` or a GQA paged step, no autograd (the model itself is
    checked once per cache)."""
    if steps != 1 or batch > MAX_BATCH or torch.is_grad_enabled():
        return False
    return type(cache) is KVCache or (isinstance(cache, PagedStep) and not cache.cache.is_latent)


def cache_identity(cache):
    """What a decoder stack is built for: the cache itself, or the pool behind a paged step (a new
    ``PagedStep`` comes with every step)."""
    return cache.cache if isinstance(cache, PagedStep) else cache


def decode_fused(stack: _core.DecoderStack, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 cache: KVCache | PagedStep, start: int, scaling: float) -> torch.Tensor:
    """Every layer for ``x [B, 1, hidden]`` (the embeddings); returns the last layer's output."""
    batch, _, hidden = x.shape
    h = x.reshape(batch, hidden).contiguous()
    cos, sin = (t.reshape(batch, -1).contiguous() for t in rope)
    threads = torch.get_num_threads()
    if isinstance(cache, PagedStep):
        positions = cache.positions[:, 0].to(torch.int32)
        stack.decode(h, cos, sin, cache.cache.keys, cache.cache.values, positions, block_table=cache.block_table,
                     scaling=scaling, n_threads=threads)
    else:
        positions = torch.full((batch,), start, dtype=torch.int32)
        stack.decode(h, cos, sin, cache.keys, cache.values, positions, key_mask=cache.key_mask, scaling=scaling,
                     n_threads=threads)
    return h.view(batch, 1, hidden)
