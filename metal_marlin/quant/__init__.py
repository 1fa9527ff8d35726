"""How weights are chosen: round-to-nearest, GPTQ, and the trellis encoder (Viterbi + LDLQ).

``quantize_weight`` is the one entry point that serves every format of the registry.
"""

from __future__ import annotations

from typing import Any

import torch

from ..formats import GroupFormat, QuantizedWeight, get_format
from .trellis import quantize_trellis


def quantize_weight(
    w: torch.Tensor,
    format: str = "int4",
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool | None = None,
    scale_method: str = "mse",
    name: str = "weight",
    **trellis_settings: Any,
) -> QuantizedWeight:
    """Quantize a weight ``[N, K]`` (or, for group formats, a stack ``[E, N, K]``).

    Group formats (int2/3/4/8, fp4, fp8) round to nearest: ``group_size=-1`` is per-channel and
    ``symmetric=None`` takes the format's default. ``format="trellis"`` takes ``bits`` (1..8, default
    4) and trellis settings (``codebook``, ``hessian``, ...; see ``quantize_trellis``). See docs/formats.md.
    """
    fmt = get_format(format, bits)
    if isinstance(fmt, GroupFormat):
        if trellis_settings:
            raise TypeError(f"{name}: {fmt.name} does not take {sorted(trellis_settings)}")
        return fmt.quantize(w, group_size=group_size, symmetric=symmetric, scale_method=scale_method, name=name)
    return quantize_trellis(w, bits=4 if bits is None else bits, name=name, **trellis_settings)


__all__ = ["quantize_trellis", "quantize_weight"]
