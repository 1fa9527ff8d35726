"""metal-marlin: low-bit quantized LLM inference with fused dequantize+matmul kernels.

Public API:

* ``quantize_weight(w, format="int4", bits=None, group_size=128)`` -> ``QuantizedWeight``
  (``.dequantize()``); ``FORMATS`` / ``get_format`` / ``register_format``: the format registry.
* ``MetalQuantizedLinear``: drop-in ``nn.Linear`` with a quantized weight.
* ``QuantizedExperts``: transformers' fused MoE experts with quantized weights.
* ``replace_linear_layers(model, format=..., group_size=..., skip=..., layer_config=...)``.
* ``save_quantized(model, path)`` / ``load_quantized_model(path)``: the checkpoint format; after
  ``import metal_marlin``, ``AutoModelForCausalLM.from_pretrained(path)`` reads it too.
* ``TrellisForCausalLM.from_pretrained(path)``: our runtime (llama, qwen2, qwen3, qwen3_moe,
  glm4_moe_lite, deepseek_v3) with ``generate`` / ``generate_stream``; ``load_model(source)`` resolves
  any MODEL argument (checkpoint, GGUF, transformers directory, None = the embedded default).
* ``read_gguf(path)``: import a llama-family GGUF file.

Importing the package registers the custom ops ``torch.ops.metal_marlin.*``.
"""

from .formats import (
    FORMATS,
    GroupQuantizedWeight,
    QuantizedWeight,
    TrellisWeight,
    get_format,
    register_format,
)
from .models import CheckpointError, TrellisForCausalLM, load_model, load_quantized_model, read_gguf, save_quantized
from .nn import MetalQuantizedLinear, QuantizedExperts, ReplacementSummary, replace_linear_layers
from .ops import quant_matmul
from .quant import quantize_weight

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FORMATS",
    "GroupQuantizedWeight",
    "MetalQuantizedLinear",
    "QuantizedExperts",
    "QuantizedWeight",
    "ReplacementSummary",
    "TrellisForCausalLM",
    "TrellisWeight",
    "get_format",
    "load_model",
    "load_quantized_model",
    "quant_matmul",
    "quantize_weight",
    "read_gguf",
    "register_format",
    "replace_linear_layers",
    "save_quantized",
]
