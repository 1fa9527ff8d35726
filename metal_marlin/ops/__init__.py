"""Custom ops (``torch.ops.metal_marlin.*``): each declared once with its backends beside it."""

from .attention import flash_attention_prefill, mla_attention_decode, paged_attention_decode
from .experts import moe_experts
from .group_matmul import check_quant_matmul_args, quant_matmul, reference_quant_matmul
from .trellis import hadamard, reference_trellis_matmul, trellis_matmul

__all__ = [
    "check_quant_matmul_args",
    "flash_attention_prefill",
    "hadamard",
    "mla_attention_decode",
    "moe_experts",
    "paged_attention_decode",
    "quant_matmul",
    "reference_quant_matmul",
    "reference_trellis_matmul",
    "trellis_matmul",
]
