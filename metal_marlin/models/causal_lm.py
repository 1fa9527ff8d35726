"""``TrellisForCausalLM``: our own decoder runtime for llama, qwen2, qwen3, qwen3_moe, glm4_moe_lite and
deepseek_v3, built from the shared blocks, with preallocated caches and generation.

transformers is used to read configs and checkpoints, and as the oracle in the tests; the forward pass
is ours. Module and parameter names are transformers' own, so any state dict (and any of our quantized
modules, installed by name) drops in unchanged.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..generation import SamplingParams, generate_tokens
from ..nn import QUANTIZED_MODULES, DenseExperts, GroupedExperts, QuantizedEmbedding, is_fused_experts, replace_module
from .attention import GQAAttention, MLAAttention
from .cache import CacheState, KVCache, MLACache
from .checkpoint import load_transformers_checkpoint
from .fused_decode import build_decoder_stack, cache_identity, decode_fused, runs_fused, unsupported_reason
from .layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from .loading import load_transformers_model
from .moe import MoEBlock, SigmoidGroupRouter, SoftmaxRouter
from .paged_cache import PagedKVCache, PagedStep


@dataclass(frozen=True)
class Architecture:
    """What distinguishes the supported families (everything else is shared)."""

    attention: str  # "gqa" | "mla"
    qk_norm: bool = False
    qkv_bias: bool | None = None  # None: config.attention_bias
    router: str | None = None  # None (dense), "softmax", "sigmoid_group"


ARCHITECTURES = {
    "llama": Architecture("gqa"),
    "qwen2": Architecture("gqa", qkv_bias=True),
    "qwen3": Architecture("gqa", qk_norm=True),
    "qwen3_moe": Architecture("gqa", qk_norm=True, router="softmax"),
    "glm4_moe_lite": Architecture("mla", router="sigmoid_group"),
    "deepseek_v3": Architecture("mla", router="sigmoid_group"),
}


def architecture_of(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported by TrellisForCausalLM; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    if getattr(config, "use_sliding_window", False):
        raise ValueError(f"{model_type}: sliding-window attention is not supported")
    return ARCHITECTURES[model_type]


def _is_moe_layer(config, arch: Architecture, layer_idx: int) -> bool:
    if arch.router is None:
        return False
    if config.model_type == "qwen3_moe":
        return (layer_idx not in config.mlp_only_layers and config.num_experts > 0
                and (layer_idx + 1) % config.decoder_sparse_step == 0)
    layer_types = getattr(config, "mlp_layer_types", None)
    if layer_types is not None:
        return layer_types[layer_idx] == "sparse"
    return layer_idx >= config.first_k_dense_replace


def _mlp(config, arch: Architecture, layer_idx: int) -> nn.Module:
    from transformers.activations import ACT2FN

    act_fn = ACT2FN[config.hidden_act]
    if not _is_moe_layer(config, arch, layer_idx):
        return SwiGLUMLP(config.hidden_size, config.intermediate_size, act_fn, getattr(config, "mlp_bias", False))
    top_k = config.num_experts_per_tok
    if arch.router == "softmax":
        gate = SoftmaxRouter(config.num_experts, config.hidden_size, top_k, config.norm_topk_prob)
        return MoEBlock(gate, config.num_experts, config.hidden_size, config.moe_intermediate_size, act_fn)
    experts = config.n_routed_experts
    gate = SigmoidGroupRouter(experts, config.hidden_size, top_k, config.n_group, config.topk_group,
                              config.norm_topk_prob, config.routed_scaling_factor)
    shared = config.moe_intermediate_size * config.n_shared_experts if config.n_shared_experts else None
    return MoEBlock(gate, experts, config.hidden_size, config.moe_intermediate_size, act_fn, shared)


class DecoderLayer(nn.Module):
    def __init__(self, config, arch: Architecture, layer_idx: int) -> None:
        super().__init__()
        if arch.attention == "mla":
            self.self_attn = MLAAttention(config, layer_idx)
        elif arch.qkv_bias is None:  # llama, qwen3: one flag for all four projections
            self.self_attn = GQAAttention(config, layer_idx, config.attention_bias, config.attention_bias,
                                          arch.qk_norm)
        else:  # qwen2: biased q/k/v, unbiased o
            self.self_attn = GQAAttention(config, layer_idx, arch.qkv_bias, False, arch.qk_norm)
        self.mlp = _mlp(config, arch, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache, start) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, decoder layers, final norm (transformers' ``model.*``)."""

    def __init__(self, config, arch: Architecture) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, arch, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class TrellisForCausalLM(nn.Module):
    """A causal language model running on our blocks, caches and kernels.

    ``forward(input_ids, attention_mask=None, cache=None, logits_to_keep=0)`` returns logits
    ``[B, T, vocab]`` (the last ``logits_to_keep`` positions if > 0). With a cache, the input continues
    the cached sequences; without one, it is a complete sequence.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.architecture = architecture_of(config)
        self.model = DecoderStack(config, self.architecture)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._decoder_stack = None  # (weak ref to the cache, _core.DecoderStack)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module) -> TrellisForCausalLM:
        """Take over the weights of a transformers model (dense or carrying our quantized modules, e.g.
        from ``load_transformers_checkpoint``): modules are moved, not copied."""
        config = hf_model.config
        quantized_embedding = isinstance(hf_model.get_input_embeddings(), QuantizedEmbedding)
        dense_tie = config.tie_word_embeddings and not quantized_embedding
        with torch.device("meta"):
            model = cls(config)
        if quantized_embedding:  # a tied head shares its tensors and is moved over below like any linear
            replace_module(model, "model.embed_tokens", hf_model.get_input_embeddings())
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, nn.Linear | DenseExperts) or (name == "lm_head" and dense_tie):
                continue
            theirs = hf_model.get_submodule(name)
            if isinstance(mod, DenseExperts) and not isinstance(theirs, GroupedExperts):
                if not is_fused_experts(theirs):
                    raise ValueError(f"{name}: unsupported experts module {type(theirs).__name__}")
                theirs = DenseExperts(theirs.gate_up_proj.data, theirs.down_proj.data, theirs.act_fn, name)
            replace_module(model, name, theirs)
        state = hf_model.state_dict()
        own = model.state_dict()
        missing = [k for k, v in own.items() if v.is_meta and k not in state]
        if missing and not (dense_tie and missing == ["lm_head.weight"]):
            raise ValueError(f"the transformers model lacks {', '.join(missing[:5])}")
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].is_meta},
                              strict=False, assign=True)
        if dense_tie:
            model.lm_head.weight = model.model.embed_tokens.weight
        device = model.model.norm.weight.device
        model.model.rotary = RotaryEmbedding(config).to(device)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, device: str = "cpu", dtype: torch.dtype | None = None
                        ) -> TrellisForCausalLM:
        """Load our checkpoint, a transformers checkpoint directory, a GGUF file, or (``None``) the
        embedded default model."""
        hf_model, _ = load_transformers_model(None if path is None else str(path), device, dtype)
        return cls.from_hf_model(hf_model)

    # -- forward ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> CacheState:
        """A preallocated cache for ``batch`` sequences of up to ``max_len`` tokens."""
        c = self.config
        if self.architecture.attention == "mla":
            return MLACache(c.num_hidden_layers, batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, self.dtype,
                            self.device)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, head_dim, head_dim, self.dtype,
                       self.device)

    def new_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A block pool of ``num_blocks`` blocks of ``block_size`` positions (``PagedKVCache``), for serving
        many sequences; a forward goes through its ``step`` view."""
        c = self.config
        if self.architecture.attention == "mla":
            return PagedKVCache(c.num_hidden_layers, num_blocks, block_size, self.dtype, self.device,
                                latent_dim=c.kv_lora_rank + c.qk_rope_head_dim)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return PagedKVCache(c.num_hidden_layers, num_blocks, block_size, self.dtype, self.device,
                            kv_heads=c.num_key_value_heads, head_dim=head_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: CacheState | PagedStep | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got {tuple(input_ids.shape)}")
        batch, steps = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch, steps)
        step_mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                     else attention_mask[:, -steps:].bool())
        start, positions = cache.begin(step_mask)
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary(positions, x.dtype)
        stack = self._decoder_stack_for(cache) if runs_fused(cache, batch, steps) else None
        if stack is not None:
            x = decode_fused(stack, x, rope, cache, start, self.model.layers[0].self_attn.scaling)
        else:
            mask = cache.attention_mask(start, steps)
            for layer in self.model.layers:
                x = layer(x, rope, mask, cache, start)
        cache.end(step_mask)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

    def _decoder_stack_for(self, cache: CacheState | PagedStep):
        """The fused decode step (``models/fused_decode.py``) for steps into ``cache``, or None when this
        model cannot run it. Built once per cache, i.e. per generation, so modules replaced between
        generations are picked up."""
        owner = cache_identity(cache)
        if self._decoder_stack is None or self._decoder_stack[0]() is not owner:
            stack = build_decoder_stack(self) if unsupported_reason(self) is None else None
            self._decoder_stack = (weakref.ref(owner), stack)
        return self._decoder_stack[1]

    # -- generation ------------------------------------------------------------------------------

    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int = 64, attention_mask=None,
                        stop_token_ids=None, **sampling: Any) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence (``[B]``) as it is produced; see ``generate``."""
        stop = self.stop_ids(stop_token_ids)
        yield from generate_tokens(self, input_ids, max_new_tokens, SamplingParams(**sampling), attention_mask,
                                   stop, self._pad_id(stop))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 stop_token_ids: list[int] | None = None, seed: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` new tokens ``[B, T + n]``: greedy when ``temperature`` is
        0, else sampled (reproducibly with ``seed``). A sequence ends at a stop token (default: the
        config's EOS ids); finished sequences are padded with the pad id (else the first stop id).
        ``attention_mask`` marks real tokens of a left-padded batch."""
        tokens = list(self.generate_stream(input_ids, max_new_tokens, attention_mask, stop_token_ids,
                                           temperature=temperature, top_k=top_k, top_p=top_p,
                                           repetition_penalty=repetition_penalty, seed=seed))
        new = torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.cat((input_ids, new), dim=1)

    def stop_ids(self, stop_token_ids: list[int] | None = None) -> list[int]:
        """``stop_token_ids`` if given, else the config's EOS ids."""
        if stop_token_ids is not None:
            return list(stop_token_ids)
        eos = self.config.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _pad_id(self, stop: list[int]) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        return pad if pad is not None else (stop[0] if stop else 0)

    def extra_repr(self) -> str:
        quantized = sum(isinstance(m, QUANTIZED_MODULES) for m in self.modules())
        return f"model_type={self.config.model_type}, quantized modules={quantized}"


def is_supported(config) -> bool:
    return getattr(config, "model_type", None) in ARCHITECTURES


def load_model(source: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for any MODEL argument (None = the embedded default): a
    ``TrellisForCausalLM`` for the supported architectures, else the transformers model."""
    hf_model, tokenizer = load_transformers_model(source, device, dtype)
    return (TrellisForCausalLM.from_hf_model(hf_model) if is_supported(hf_model.config) else hf_model), tokenizer


def load_quantized_model(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a metal-marlin checkpoint: ``(model, tokenizer)`` (tokenizer None if not saved), the model a
    ``TrellisForCausalLM`` for the supported architectures, else transformers' model."""
    hf_model, tokenizer = load_transformers_checkpoint(path, device, dtype)
    return (TrellisForCausalLM.from_hf_model(hf_model) if is_supported(hf_model.config) else hf_model), tokenizer
