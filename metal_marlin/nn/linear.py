"""``MetalQuantizedLinear``: a drop-in ``nn.Linear`` whose weight is group-quantized.

The name is historical: the forward goes through ``torch.ops.metal_marlin.quant_matmul``, which
runs on every backend (fused CPU kernel, Metal on Apple GPUs, pure-torch reference elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import GroupQuantizedWeight
from ..ops import quant_matmul
from ..quant import quantize_weight
from .buffers import QuantizedWeightBuffers


class MetalQuantizedLinear(QuantizedWeightBuffers):
    """``y = x @ dequant(W).T + b`` with W stored as packed codes, float16 scales (and offsets).

    Build one with :meth:`from_float` or :meth:`from_quantized`, or construct an empty one and
    ``load_state_dict`` into it. ``name`` (the qualified module name, set by
    ``replace_linear_layers``) prefixes every error.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "int4",
        group_size: int = 128,
        symmetric: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__((out_features, in_features), format, group_size, symmetric, device, name)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        format: str = "int4",
        group_size: int = 128,
        symmetric: bool | None = None,
        scale_method: str = "mse",
        name: str = "",
    ) -> MetalQuantizedLinear:
        """Quantize an ``nn.Linear`` by round-to-nearest (docs/formats.md)."""
        qw = quantize_weight(linear.weight, format, group_size=group_size, symmetric=symmetric,
                             scale_method=scale_method, name=name or "weight")
        return cls.from_quantized(qw, linear.bias, name=name)

    @classmethod
    def from_quantized(
        cls, qw: GroupQuantizedWeight, bias: torch.Tensor | None = None, name: str = ""
    ) -> MetalQuantizedLinear:
        """Wrap an already quantized weight (from GPTQ, a checkpoint, a GGUF file...)."""
        out_features, in_features = qw.shape
        dtype = bias.dtype if bias is not None else torch.float32
        mod = cls(in_features, out_features, bias=bias is not None, format=qw.format.name,
                  group_size=qw.group_size, symmetric=qw.symmetric, dtype=dtype,
                  device=qw.packed.device, name=name)
        mod.load_quantized(qw)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return quant_matmul(x, self.packed, self.scales, self.offsets, self.bias, self.format, self.group_size)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self.name or 'MetalQuantizedLinear'}: {err}") from err

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.format_repr()}")
