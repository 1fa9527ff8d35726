"""``metal_marlin::quant_matmul``: ``y = x @ dequant(W).T + bias`` for group-quantized weights.

Declared once here; the pure-torch reference is the default implementation (any device) and the
oracle every backend is tested against; the fused CPU kernel in ``_core`` and the fake (meta) kernel
are registered beside it.
"""

from __future__ import annotations

import torch

from .. import _core
from ..formats import GROUP_FORMATS, GroupQuantizedWeight, get_format, n_groups
from ..formats.packing import PACK_BLOCK

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_quant_matmul_args(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> None:
    """Raise a clear error for inputs the kernels cannot take (shared by every backend)."""
    if format not in GROUP_FORMATS:
        raise ValueError(f"quant_matmul: unknown format {format!r}; known: {', '.join(sorted(GROUP_FORMATS))}")
    fmt = GROUP_FORMATS[format]
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"quant_matmul: activations must be float32, float16 or bfloat16, got {x.dtype}")
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise TypeError(f"quant_matmul: packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], x.shape[-1]
    if k % PACK_BLOCK:
        raise ValueError(f"quant_matmul: K={k} input features is not a multiple of the {PACK_BLOCK}-weight "
                         "packing block")
    if packed.shape[1] * 32 != k * fmt.bits:
        raise ValueError(
            f"quant_matmul: x has K={k} input features but packed {tuple(packed.shape)} holds "
            f"{packed.shape[1] * 32 // fmt.bits} {format} codes per row"
        )
    if group_size <= 0 or group_size % PACK_BLOCK:
        raise ValueError(f"quant_matmul: group_size={group_size} must be a positive multiple of {PACK_BLOCK}")
    groups = n_groups(k, group_size)
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"quant_matmul: scales must be float16 of shape {(n, groups)}, "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )
    if offsets is not None:
        if not fmt.supports_asymmetric:
            raise ValueError(f"quant_matmul: format {format} takes no offsets")
        if offsets.dtype != torch.float16 or offsets.shape != scales.shape:
            raise ValueError(
                f"quant_matmul: offsets must be float16 of shape {tuple(scales.shape)}, "
                f"got {offsets.dtype} {tuple(offsets.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"quant_matmul: bias must have shape ({n},), got {tuple(bias.shape)}")
    for arg_name, t in (("packed", packed), ("scales", scales), ("offsets", offsets), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"quant_matmul: {arg_name} is on {t.device} but x is on {x.device}")


def reference_quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> torch.Tensor:
    """Dequantize in pure torch, then a float32 matmul. Works on any device."""
    check_quant_matmul_args(x, packed, scales, offsets, bias, format, group_size)
    fmt = get_format(format)
    qw = GroupQuantizedWeight(fmt, (packed.shape[0], x.shape[-1]), packed, scales, offsets, group_size)
    y = x.float() @ qw.dequantize(torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("metal_marlin::quant_matmul", mutates_args=())
def quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias``; x has any leading shape, W is ``[N, K]`` (docs/formats.md)."""
    return reference_quant_matmul(x, packed, scales, offsets, bias, format, group_size)


@quant_matmul.register_kernel("cpu")
def _quant_matmul_cpu(x, packed, scales, offsets, bias, format, group_size):
    check_quant_matmul_args(x, packed, scales, offsets, bias, format, group_size)
    lead, k, n = x.shape[:-1], x.shape[-1], packed.shape[0]
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype)
    if x2.shape[0] == 0:
        return out.reshape(*lead, n)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    _core.quant_matmul(
        x2, packed.contiguous(), scales.contiguous(),
        None if offsets is None else offsets.contiguous(), bias, out,
        format, group_size, torch.get_num_threads(),
    )
    return out.reshape(*lead, n)


@quant_matmul.register_fake
def _quant_matmul_fake(x, packed, scales, offsets, bias, format, group_size):
    check_quant_matmul_args(x, packed, scales, offsets, bias, format, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
