"""Custom ops (``torch.ops.metal_marlin.*``): each declared once with its backends beside it."""

from .group_matmul import check_quant_matmul_args, quant_matmul, reference_quant_matmul

__all__ = ["check_quant_matmul_args", "quant_matmul", "reference_quant_matmul"]
