"""Quantized drop-in modules and the in-place model rewriter."""

from .buffers import QuantizedWeightBuffers
from .experts import QuantizedExperts
from .linear import MetalQuantizedLinear
from .replace import DEFAULT_SKIP, ReplacementSummary, is_fused_experts, replace_linear_layers

__all__ = [
    "DEFAULT_SKIP",
    "MetalQuantizedLinear",
    "QuantizedExperts",
    "QuantizedWeightBuffers",
    "ReplacementSummary",
    "is_fused_experts",
    "replace_linear_layers",
]
