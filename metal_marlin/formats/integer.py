"""Integer grids int2, int3, int4, int8: symmetric (``s * (u - mid)``) or asymmetric (``s * u + o``).

The four widths differ only in ``bits``, so one class serves them; each width is its own registry row.
"""

from __future__ import annotations

import torch

from .base import GroupFormat


class IntFormat(GroupFormat):
    supports_asymmetric = True

    def __init__(self, bits: int, default_symmetric: bool) -> None:
        self.name = f"int{bits}"
        self.bits = bits
        self.mid = 2 ** (bits - 1)
        # absmax maps to the largest positive code, so -mid is reached only by clamping.
        self.qmax = float(self.mid - 1)
        self.default_symmetric = default_symmetric

    def code_values(self) -> torch.Tensor:
        return torch.arange(2**self.bits, dtype=torch.float64) - self.mid

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v).clamp_(-self.mid, self.mid - 1).long() + self.mid


# int8 is accurate enough symmetric (and cheaper); narrow grids gain from an offset.
INT2 = IntFormat(2, default_symmetric=False)
INT3 = IntFormat(3, default_symmetric=False)
INT4 = IntFormat(4, default_symmetric=False)
INT8 = IntFormat(8, default_symmetric=True)
