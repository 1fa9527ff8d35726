"""Tiny random transformers models built from configs (no hub access needed).

Sizes are multiples of 32 so every group size used by the tests divides them, and deliberately
not powers of two where the architecture allows.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Glm4MoeLiteConfig,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(vocab_size=320, hidden_size=96, num_hidden_layers=2, max_position_embeddings=128,
              tie_word_embeddings=False)


def llama_config() -> LlamaConfig:
    return LlamaConfig(**COMMON, intermediate_size=160, num_attention_heads=6, num_key_value_heads=2,
                       head_dim=16)


def qwen3_config() -> Qwen3Config:
    return Qwen3Config(**COMMON, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32)


def qwen3_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**COMMON, intermediate_size=192, moe_intermediate_size=64, num_experts=8,
                          num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def glm4_moe_lite_config() -> Glm4MoeLiteConfig:
    return Glm4MoeLiteConfig(**COMMON, intermediate_size=192, moe_intermediate_size=64, n_routed_experts=8,
                             num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=4,
                             num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                             qk_nope_head_dim=32, v_head_dim=32, first_k_dense_replace=1,
                             mlp_layer_types=["dense", "sparse"])


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(**COMMON, intermediate_size=224, num_attention_heads=6, num_key_value_heads=3)


def deepseek_v3_config() -> DeepseekV3Config:
    """Grouped top-k routing (4 groups, 2 kept), q without LoRA, interleaved RoPE with YaRN scaling."""
    return DeepseekV3Config(**COMMON, intermediate_size=192, moe_intermediate_size=32, n_routed_experts=8,
                            num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2,
                            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=96,
                            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, first_k_dense_replace=1,
                            routed_scaling_factor=2.5, rope_interleave=True,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 32, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})


CONFIGS = {
    "llama": llama_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "qwen3_moe": qwen3_moe_config,
    "glm4_moe_lite": glm4_moe_lite_config,
    "deepseek_v3": deepseek_v3_config,
}


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A float32 model with random weights. Fused 3-D expert weights get a real init, and routers a
    scale that gives trained-model-like top-k margins: with near-tied random router logits, the
    0.5% weight error of int8 already flips expert choices and no logit comparison means anything."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or "gate.weight" in name or name.endswith("e_score_correction_bias"):
                p.normal_(0.0, 0.05 if p.dim() == 3 else 0.3)
    return model
