"""``TrellisLinear``: a drop-in ``nn.Linear`` whose weight is trellis-coded (docs/formats.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import TRELLIS, TrellisWeight
from ..formats.trellis import CODEBOOKS, TILE, check_bits
from ..ops import trellis_matmul
from ..quant import quantize_trellis


class TrellisLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W = diag(sv) H_out Q H_in diag(su)``; buffers ``trellis``, ``su``, ``sv``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        codebook: str = "3inst",
        had_in: int = 128,
        had_out: int = 128,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        label = name or "TrellisLinear"
        check_bits(bits)
        if codebook not in CODEBOOKS:
            raise ValueError(f"{label}: unknown codebook {codebook!r}; choose from {CODEBOOKS}")
        if in_features % TILE or out_features % TILE:
            raise ValueError(f"{label}: trellis needs dimensions that are multiples of {TILE}, "
                             f"got {out_features}x{in_features}")
        self.name = name
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.codebook, self.had_in, self.had_out = bits, codebook, had_in, had_out
        self.register_buffer("trellis", torch.zeros(out_features // TILE, in_features // TILE, 8 * bits,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("su", torch.ones(in_features, dtype=torch.float16, device=device))
        self.register_buffer("sv", torch.ones(out_features, dtype=torch.float16, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_quantized(cls, tw: TrellisWeight, bias: torch.Tensor | None = None, name: str = "") -> TrellisLinear:
        out_features, in_features = tw.shape
        mod = cls(in_features, out_features, bias=bias is not None, dtype=bias.dtype if bias is not None
                  else torch.float32, device=tw.trellis.device, name=name, **tw.settings())
        mod.load_quantized(tw)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def load_quantized(self, tw: TrellisWeight) -> None:
        """Copy a trellis weight of matching layout into the buffers."""
        mine = ((self.out_features, self.in_features), self.bits, self.codebook, self.had_in, self.had_out)
        theirs = (tuple(tw.shape), tw.bits, tw.codebook, tw.had_in, tw.had_out)
        if mine != theirs:
            raise ValueError(f"{self.name or 'TrellisLinear'}: cannot load {theirs} into {mine} "
                             "(shape, bits, codebook, had_in, had_out)")
        self.trellis.copy_(tw.trellis)
        self.su.copy_(tw.su)
        self.sv.copy_(tw.sv)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, codebook: str = "3inst",
                   hessian: torch.Tensor | None = None, name: str = "", **settings) -> TrellisLinear:
        tw = quantize_trellis(linear.weight, bits=bits, codebook=codebook, hessian=hessian, name=name or "weight",
                              **settings)
        return cls.from_quantized(tw, linear.bias, name=name)

    @property
    def quantized_weight(self) -> TrellisWeight:
        return TrellisWeight(TRELLIS, (self.out_features, self.in_features), self.trellis, self.su, self.sv,
                             self.bits, self.codebook, self.had_in, self.had_out)

    def dequantize_weight(self) -> torch.Tensor:
        return self.quantized_weight.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return trellis_matmul(x, self.trellis, self.su, self.sv, self.bias, self.bits, self.codebook,
                                  self.had_in, self.had_out)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self.name or 'TrellisLinear'}: {err}") from err

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=trellis, bits={self.bits}, codebook={self.codebook}, had_in={self.had_in}, "
                f"had_out={self.had_out}, {self.quantized_weight.bits_per_weight:.3f} bits/weight")
