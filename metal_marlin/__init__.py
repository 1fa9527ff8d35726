"""metal-marlin: low-bit quantized LLM inference with fused dequantize+matmul kernels.

Public API:

* ``quantize_weight(w, format="int4", bits=None, group_size=128)`` -> ``QuantizedWeight``
  (``.dequantize()``); ``FORMATS`` / ``get_format`` / ``register_format``: the format registry.
* ``MetalQuantizedLinear``: drop-in ``nn.Linear`` with a quantized weight.
* ``QuantizedExperts``: transformers' fused MoE experts with quantized weights.
* ``replace_linear_layers(model, format=..., group_size=..., skip=..., layer_config=...)``.

Importing the package registers the custom ops ``torch.ops.metal_marlin.*``.
"""

from .formats import (
    FORMATS,
    GroupQuantizedWeight,
    QuantizedWeight,
    get_format,
    quantize_weight,
    register_format,
)
from .nn import MetalQuantizedLinear, QuantizedExperts, ReplacementSummary, replace_linear_layers
from .ops import quant_matmul

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "GroupQuantizedWeight",
    "MetalQuantizedLinear",
    "QuantizedExperts",
    "QuantizedWeight",
    "ReplacementSummary",
    "get_format",
    "quant_matmul",
    "quantize_weight",
    "register_format",
    "replace_linear_layers",
]
