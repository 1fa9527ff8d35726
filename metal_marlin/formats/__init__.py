"""Weight formats: the registry (one row per format) and the public ``quantize_weight``.

Adding a format means adding one module and one ``register_format`` call; nothing else in the
package switches on format names.
"""

from __future__ import annotations

import torch

from .base import GroupFormat, GroupQuantizedWeight, QuantizedWeight, n_groups, resolve_group_size
from .fp4 import FP4
from .fp8 import FP8
from .integer import INT2, INT3, INT4, INT8

FORMATS: dict[str, GroupFormat] = {}


def register_format(fmt: GroupFormat) -> GroupFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (INT2, INT3, INT4, INT8, FP4, FP8):
    register_format(_fmt)


def get_format(format: str | GroupFormat, bits: int | None = None) -> GroupFormat:
    """Look a format up by name (``"int4"``) or by family and width (``"int", bits=4``)."""
    if isinstance(format, GroupFormat):
        fmt = format
    elif not isinstance(format, str):
        raise TypeError(f"format must be a name such as 'int4', got {type(format).__name__}")
    elif format in FORMATS:
        fmt = FORMATS[format]
    elif bits is not None and f"{format}{bits}" in FORMATS:
        fmt = FORMATS[f"{format}{bits}"]
    else:
        wanted = format if bits is None else f"{format} with bits={bits}"
        raise ValueError(f"unknown format {wanted!r}; known formats: {', '.join(sorted(FORMATS))}")
    if bits is not None and bits != fmt.bits:
        raise ValueError(f"format {fmt.name!r} has {fmt.bits} bits, not bits={bits}")
    return fmt


def quantize_weight(
    w: torch.Tensor,
    format: str = "int4",
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool | None = None,
    scale_method: str = "mse",
    name: str = "weight",
) -> QuantizedWeight:
    """Quantize a weight ``[N, K]`` (or a stack ``[E, N, K]``) by round-to-nearest.

    ``group_size=-1`` is per-channel. ``symmetric=None`` takes the format's default (int8 symmetric,
    narrower integer grids asymmetric; fp formats are always symmetric). See docs/formats.md.
    """
    fmt = get_format(format, bits)
    return fmt.quantize(w, group_size=group_size, symmetric=symmetric, scale_method=scale_method, name=name)


__all__ = [
    "FORMATS",
    "GroupFormat",
    "GroupQuantizedWeight",
    "QuantizedWeight",
    "get_format",
    "n_groups",
    "quantize_weight",
    "register_format",
    "resolve_group_size",
]
