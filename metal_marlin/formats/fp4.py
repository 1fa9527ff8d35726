"""fp4: OCP E2M1 codes (sign bit 3, 2 exponent bits, 1 mantissa bit) times a per-group scale."""

from __future__ import annotations

import torch

from .base import GroupFormat

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class FP4Format(GroupFormat):
    name = "fp4"
    bits = 4
    qmax = 6.0

    def code_values(self) -> torch.Tensor:
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
        return torch.cat([mags, -mags])

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        mags = torch.tensor(E2M1_MAGNITUDES, dtype=v.dtype, device=v.device)
        mids = (mags[1:] + mags[:-1]) / 2
        a = v.abs()
        idx = torch.bucketize(a, mids)  # a == mids[j] gives j, the lower neighbour
        # Ties go to the even code (mantissa bit 0): a tie at an odd lower neighbour moves up.
        tie = (idx < 7) & (a == mids[idx.clamp(max=6)]) & (idx % 2 == 1)
        idx = idx + tie.long()
        return idx + 8 * (v < 0).long()


FP4 = FP4Format()
