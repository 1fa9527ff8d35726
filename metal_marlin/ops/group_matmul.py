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
from . import metal
from .metal import Launch, ParamsStruct, cdiv

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


# ---- Metal (shaders/quant_matmul.metal; launch geometry and params: shaders/quant_matmul.h) -----------

QUANT_GEMV_ROWS, QUANT_GEMV_MAX_M, QUANT_GEMV_THREADS = 4, 8, 128
QUANT_GEMM_BM, QUANT_GEMM_BN, QUANT_GEMM_THREADS = 32, 32, 128
QuantMatmulParams = ParamsStruct("QuantMatmulParams", (
    ("uint", "M"), ("uint", "N"), ("uint", "K"), ("uint", "group_size"), ("uint", "has_bias")))


def quant_matmul_kernel(format: str, asymmetric: bool, m: int) -> str:
    """The instantiation for ``m`` activation rows: the GEMV (decode) up to QUANT_GEMV_MAX_M rows, the
    tiled GEMM above; ``_asym`` when the weight has offsets."""
    kind = "gemv" if m <= QUANT_GEMV_MAX_M else "gemm"
    return f"quant_{kind}_{format}{'_asym' if asymmetric else ''}"


METAL_KERNELS = tuple(quant_matmul_kernel(name, asymmetric, m)
                      for name, fmt in GROUP_FORMATS.items()
                      for asymmetric in ((False, True) if fmt.supports_asymmetric else (False,))
                      for m in (1, QUANT_GEMV_MAX_M + 1))


def quant_matmul_launches(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                          bias: torch.Tensor | None, out: torch.Tensor, format: str, group_size: int) -> list[Launch]:
    """``out [M, N] = x [M, K] @ dequant(W).T + bias`` on the GPU (float16 x, scales, offsets, bias and out;
    contiguous). Absent offsets and bias are bound to x: the kernels never read them."""
    m, k = x.shape
    n = packed.shape[0]
    if m <= QUANT_GEMV_MAX_M:
        grid, threads = (cdiv(n, QUANT_GEMV_ROWS), cdiv(m, QUANT_GEMV_MAX_M), 1), QUANT_GEMV_THREADS
    else:
        grid, threads = (cdiv(n, QUANT_GEMM_BN), cdiv(m, QUANT_GEMM_BM), 1), QUANT_GEMM_THREADS
    buffers = {0: x, 1: packed, 2: scales, 3: x if offsets is None else offsets, 4: x if bias is None else bias, 5: out}
    params = QuantMatmulParams.pack(M=m, N=n, K=k, group_size=group_size, has_bias=int(bias is not None))
    return [Launch(quant_matmul_kernel(format, offsets is not None, m), grid, (threads, 1, 1), buffers, {6: params})]


def quant_matmul_metal(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                       bias: torch.Tensor | None, format: str, group_size: int) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds). Device-agnostic apart from ``metal.dispatch``, so the
    tests run it on CPU tensors with the launches sent to the MSL simulator. The kernels take float16
    activations: float32/bfloat16 x is converted, and the result back."""
    check_quant_matmul_args(x, packed, scales, offsets, bias, format, group_size)
    lead, k, n = x.shape[:-1], x.shape[-1], packed.shape[0]
    half = torch.float16
    x2 = metal.metal_input(x.reshape(-1, k), half)
    out = torch.empty((x2.shape[0], n), dtype=half, device=x.device)
    if out.numel():
        metal.dispatch(quant_matmul_launches(
            x2, metal.metal_input(packed, torch.int32), metal.metal_input(scales, half),
            None if offsets is None else metal.metal_input(offsets, half),
            None if bias is None else metal.metal_input(bias, half), out, format, group_size))
    return out.to(x.dtype).reshape(*lead, n)


if _core.has_metal():
    quant_matmul.register_kernel("mps")(quant_matmul_metal)
