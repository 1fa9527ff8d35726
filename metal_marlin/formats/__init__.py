"""Weight formats: the registry (one row per format): what a quantized weight is.

Adding a format means adding one module and one ``register_format`` call; nothing else in the
package switches on format names.
"""

from __future__ import annotations

from .base import GroupFormat, GroupQuantizedWeight, QuantizedWeight, n_groups, resolve_group_size
from .fp4 import FP4
from .fp8 import FP8
from .integer import INT2, INT3, INT4, INT8
from .trellis import TRELLIS, TrellisFormat, TrellisWeight

Format = GroupFormat | TrellisFormat
FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (INT2, INT3, INT4, INT8, FP4, FP8, TRELLIS):
    register_format(_fmt)


GROUP_FORMATS: dict[str, GroupFormat] = {k: f for k, f in FORMATS.items() if isinstance(f, GroupFormat)}


def get_format(format: str | Format, bits: int | None = None) -> Format:
    """Look a format up by name (``"int4"``, ``"trellis"``) or by family and width (``"int", bits=4``).
    The trellis row serves every width (its bits are set per tensor)."""
    if isinstance(format, (GroupFormat, TrellisFormat)):
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
    if bits is not None and fmt.bits is not None and bits != fmt.bits:
        raise ValueError(f"format {fmt.name!r} has {fmt.bits} bits, not bits={bits}")
    return fmt


__all__ = [
    "FORMATS",
    "Format",
    "GROUP_FORMATS",
    "GroupFormat",
    "GroupQuantizedWeight",
    "QuantizedWeight",
    "get_format",
    "n_groups",
    "TrellisFormat",
    "TrellisWeight",
    "register_format",
    "resolve_group_size",
]
