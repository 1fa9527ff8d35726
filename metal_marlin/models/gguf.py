"""GGUF import (llama family): tensors mapped onto metal-marlin formats, config and tokenizer from metadata.

Lossless mappings (GGUF block of 32 weights -> one group of 32):
  Q4_1 ``d*q + m``      -> int4 asymmetric: scale d, offset m
  Q4_0 ``d*(q - 8)``    -> int4 symmetric:  scale d
  Q8_0 ``d*q`` (q int8) -> int8 symmetric:  scale d, code q + 128
  F16 / F32 / BF16      -> dense tensors
Other types are dequantized with the ``gguf`` package and requantized by round-to-nearest (int8 g32
for types of more than 4 bits, int4 g32 otherwise) with a warning, or refused (``on_unsupported="error"``).

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for its rotary layout; quantization
groups run along the other axis (K), so undoing it on packed rows is exact.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..formats import GroupQuantizedWeight, get_format
from ..nn import MetalQuantizedLinear, QuantizedEmbedding, replace_module
from ..quant import quantize_weight
from .checkpoint import install_tied_head, load_state_strict, materialize_non_persistent_buffers

LLAMA_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_BLOCK = 32


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and tensor."""


@dataclass
class GGUFModel:
    """What a GGUF file holds, in transformers' naming: tensors by HF parameter name."""

    path: str
    architecture: str
    config: Any
    tensors: dict[str, torch.Tensor | GroupQuantizedWeight] = field(default_factory=dict)
    source_types: dict[str, str] = field(default_factory=dict)
    has_tokenizer: bool = False

    def tokenizer(self):
        """The tokenizer rebuilt from the GGUF metadata (by transformers' GGUF converter), or None when
        the file carries no tokenizer."""
        from transformers import AutoTokenizer

        if not self.has_tokenizer:
            return None
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                             gguf_file=os.path.basename(self.path))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in LLAMA_TENSOR_NAMES:
        return LLAMA_TENSOR_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LLAMA_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{LLAMA_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def rope_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row indices that undo llama.cpp's per-head interleaving of q/k rows (HF row i = GGUF row idx[i])."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).reshape(n_heads, half, 2).transpose(1, 2).reshape(-1)


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(data).reshape(data.shape[0], -1, block_bytes)


def _fp16_field(blocks: np.ndarray, start: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].copy())


def _nibble_codes(qs: np.ndarray) -> torch.Tensor:
    """GGUF 4-bit block: byte j holds weight j (low nibble) and weight j + 16 (high nibble)."""
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return torch.from_numpy(codes.reshape(codes.shape[0], -1).copy())


def convert_q4_1(data: np.ndarray, shape: tuple[int, int]) -> GroupQuantizedWeight:
    blocks = _blocks(data, 20)
    fmt = get_format("int4")
    codes = _nibble_codes(blocks[..., 4:20])
    return GroupQuantizedWeight(fmt, shape, fmt.pack(codes), _fp16_field(blocks, 0), _fp16_field(blocks, 2), GGUF_BLOCK)


def convert_q4_0(data: np.ndarray, shape: tuple[int, int]) -> GroupQuantizedWeight:
    blocks = _blocks(data, 18)
    fmt = get_format("int4")
    codes = _nibble_codes(blocks[..., 2:18])
    return GroupQuantizedWeight(fmt, shape, fmt.pack(codes), _fp16_field(blocks, 0), None, GGUF_BLOCK)


def convert_q8_0(data: np.ndarray, shape: tuple[int, int]) -> GroupQuantizedWeight:
    blocks = _blocks(data, 34)
    fmt = get_format("int8")
    q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128
    codes = torch.from_numpy(q.reshape(q.shape[0], -1).astype(np.uint8))
    return GroupQuantizedWeight(fmt, shape, fmt.pack(codes), _fp16_field(blocks, 0), None, GGUF_BLOCK)


LOSSLESS = {"Q4_1": convert_q4_1, "Q4_0": convert_q4_0, "Q8_0": convert_q8_0}
DENSE = ("F32", "F16", "BF16")


def _select_rows(value: torch.Tensor | GroupQuantizedWeight, rows: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value[rows].contiguous()
    pick = lambda t: None if t is None else t[rows].contiguous()  # noqa: E731
    return GroupQuantizedWeight(value.format, value.shape, pick(value.packed), pick(value.scales),
                                pick(value.offsets), value.group_size)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def llama_config_from_gguf(reader, path: str):
    """A transformers ``LlamaConfig`` from the GGUF metadata (``llama.*`` keys)."""
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise GGUFImportError(f"{path}: metadata key 'llama.{key}' is missing")
        return value

    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise GGUFImportError(f"{path}: rope scaling {_field(reader, 'llama.rope.scaling.type')!r} is not supported")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def read_gguf(path: str, on_unsupported: str = "requantize") -> GGUFModel:
    """Read a llama-family GGUF file into HF-named tensors and a transformers config.

    ``on_unsupported``: ``"requantize"`` (dequantize + round-to-nearest, with a warning) or
    ``"error"`` for tensor types that have no lossless mapping.
    """
    import gguf

    if on_unsupported not in ("requantize", "error"):
        raise ValueError(f"on_unsupported must be 'requantize' or 'error', got {on_unsupported!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the gguf package raises bare ValueError/struct errors on corrupt files
        raise GGUFImportError(f"{path}: not a readable GGUF file ({err})") from err
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(f"{path}: architecture {arch!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    config = llama_config_from_gguf(reader, path)
    model = GGUFModel(path, arch, config, has_tokenizer=_field(reader, "tokenizer.ggml.model") is not None)

    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise GGUFImportError(f"{path}: tensor {t.name!r} has no place in a {arch} model")
        qtype = t.tensor_type.name
        # GGUF lists dimensions innermost first: [K, N] for a matrix.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if qtype in DENSE:
            value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
        elif len(shape) == 2 and qtype in LOSSLESS:
            value = LOSSLESS[qtype](t.data, shape)
        elif on_unsupported == "error":
            raise GGUFImportError(f"{path}: tensor {t.name!r} has type {qtype}, which has no lossless mapping "
                                  f"(supported: {', '.join([*LOSSLESS, *DENSE])}); pass on_unsupported='requantize'")
        else:
            bits = gguf.GGML_QUANT_SIZES[t.tensor_type]
            target = "int8" if 8 * bits[1] / bits[0] > 4.6 else "int4"
            warnings.warn(f"{path}: tensor {t.name!r} of type {qtype} is requantized to {target} g32 "
                          "(dequantized, then rounded to nearest)", stacklevel=2)
            dense = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
            value = quantize_weight(dense, target, group_size=GGUF_BLOCK, name=t.name) if len(shape) == 2 else dense
        if t.name.startswith("blk.") and t.name.split(".")[2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads
            value = _select_rows(value, rope_row_order(shape[0], heads))
        model.tensors[hf] = value
        model.source_types[hf] = qtype
    return model


def build_model_from_gguf(gguf_model: GGUFModel, device: str = "cpu"):
    """A transformers model holding the GGUF's weights: quantized matrices as ``MetalQuantizedLinear``
    (no requantization), norms dense float32. A quantized token embedding tied to the output head becomes
    a ``QuantizedEmbedding`` whose tensors the head shares; otherwise the embedding is dense float32."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embed_name, head_name = LLAMA_TENSOR_NAMES["token_embd.weight"], LLAMA_TENSOR_NAMES["output.weight"]
    dense: dict[str, torch.Tensor] = {}
    for name, value in gguf_model.tensors.items():
        module_name = name.rpartition(".")[0]
        if isinstance(value, GroupQuantizedWeight) and module_name in linear_names:
            replace_module(model, module_name, MetalQuantizedLinear.from_quantized(value.to(device), name=module_name))
        elif isinstance(value, GroupQuantizedWeight) and name == embed_name and gguf_model.config.tie_word_embeddings:
            embedding = QuantizedEmbedding.from_quantized(value.to(device), name=module_name)
            replace_module(model, module_name, embedding)
            install_tied_head(model, head_name.rpartition(".")[0], module_name)
        else:
            dense[name] = (value.dequantize() if isinstance(value, GroupQuantizedWeight) else value.float()).to(device)
    load_state_strict(model, dense, gguf_model.path)
    materialize_non_persistent_buffers(model, device)
    return model.eval()


def load_gguf_model(path: str, device: str = "cpu", on_unsupported: str = "requantize"):
    """``(model, tokenizer)`` from a llama-family GGUF file."""
    gguf_model = read_gguf(path, on_unsupported=on_unsupported)
    return build_model_from_gguf(gguf_model, device), gguf_model.tokenizer()
