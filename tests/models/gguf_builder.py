"""Write small llama GGUF files from a transformers Llama model, the way llama.cpp's converter does
(q/k rows permuted for its rotary layout), with the ``gguf`` package's own quantizers."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = hf.split(".")
    module, param = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{BLOCK_NAMES[module]}.{param}"


def write_llama_gguf(model, path: str, linear_type: str = "Q4_1", type_overrides: dict[str, str] | None = None):
    """Write ``model`` (LlamaForCausalLM) to ``path``. Returns ``{hf_name: dense weight as the GGUF holds it,
    in HF row order}``, computed with gguf's own dequantizer: the independent reference."""
    cfg = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    reference = {}
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        qtype_name = (type_overrides or {}).get(hf, linear_type if w.ndim == 2 and "embed" not in hf else "F32")
        qtype = GGMLQuantizationType[qtype_name]
        gw = w
        if ".q_proj." in hf:
            gw = llama_cpp_permute(w, cfg.num_attention_heads)
        elif ".k_proj." in hf:
            gw = llama_cpp_permute(w, cfg.num_key_value_heads)
        data = quantize(gw, qtype) if qtype_name != "F32" else gw
        writer.add_tensor(gguf_name(hf), data, raw_dtype=qtype if qtype_name != "F32" else None)
        # Quantization runs along rows' K, so dequantize(quantize(permuted)) = permuted(dequantize(quantize)):
        # the reference is computed on the unpermuted weight.
        ref = dequantize(quantize(w, qtype), qtype) if qtype_name != "F32" else w
        reference[hf] = torch.from_numpy(np.ascontiguousarray(ref).reshape(w.shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference
