"""fp8: OCP E4M3 ("fn": no infinities, 0x7F/0xFF are NaN) codes times a per-group scale."""

from __future__ import annotations

import torch

from .base import GroupFormat

E4M3_MAX = 448.0


def e4m3_value(code: int) -> float:
    """The E4M3 value of one byte, from the bit fields."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 15 and m == 7:
        return float("nan")
    if e == 0:
        return sign * 2.0**-6 * m / 8
    return sign * 2.0 ** (e - 7) * (1 + m / 8)


E4M3_VALUES = torch.tensor([e4m3_value(c) for c in range(256)], dtype=torch.float64)


class FP8Format(GroupFormat):
    name = "fp8"
    bits = 8
    qmax = E4M3_MAX

    def code_values(self) -> torch.Tensor:
        return E4M3_VALUES

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        # torch's float8_e4m3fn cast rounds to nearest, ties to even; saturate first (no infinities).
        f8 = v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return f8.view(torch.uint8).long()


FP8 = FP8Format()
