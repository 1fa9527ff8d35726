"""Quantized drop-in modules and the in-place model rewriter."""

from .buffers import QuantizedWeightBuffers
from .embedding import QuantizedEmbedding
from .experts import DenseExperts, GroupedExperts, QuantizedExperts, TrellisExperts
from .linear import MetalQuantizedLinear
from .replace import (
    DEFAULT_SKIP,
    QUANTIZED_MODULES,
    ReplacementSummary,
    dequantize_model,
    is_fused_experts,
    plan_replacement,
    quantized_module,
    quantized_submodules,
    replace_linear_layers,
    replace_module,
)
from .trellis import TrellisLinear

__all__ = [
    "DEFAULT_SKIP",
    "QUANTIZED_MODULES",
    "DenseExperts",
    "GroupedExperts",
    "MetalQuantizedLinear",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedWeightBuffers",
    "ReplacementSummary",
    "TrellisExperts",
    "TrellisLinear",
    "dequantize_model",
    "is_fused_experts",
    "plan_replacement",
    "quantized_module",
    "quantized_submodules",
    "replace_module",
    "replace_linear_layers",
]
