"""``metal_marlin::hadamard`` and ``metal_marlin::trellis_matmul`` (docs/formats.md, "Trellis format").

``trellis_matmul`` computes ``y = hadamard_out(hadamard_in(x * su) @ Q^T) * sv + bias`` with ``Q``
decoded from the tile streams inside the kernel. The pure-torch references are the default
implementations (any device) and the oracles; the CPU kernels come from ``_core``.
"""

from __future__ import annotations

import torch

from .. import _core
from ..formats.hadamard import hadamard_transform
from ..formats.trellis import CODEBOOKS, TILE, check_bits, decode_tiles, untile

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_hadamard_args(x: torch.Tensor, block: int) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"hadamard: x must be float32, float16 or bfloat16, got {x.dtype}")
    if block <= 0 or block & (block - 1) or x.shape[-1] % block:
        raise ValueError(f"hadamard: block {block} must be a power of two dividing the last dimension {x.shape[-1]}")


@torch.library.custom_op("metal_marlin::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Blockwise normalised Sylvester Hadamard transform of the last dimension."""
    check_hadamard_args(x, block)
    return hadamard_transform(x.float(), block).to(x.dtype)


@hadamard.register_kernel("cpu")
def _hadamard_cpu(x, block):
    check_hadamard_args(x, block)
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = torch.empty_like(x2)
    if x2.numel():
        _core.hadamard(x2, block, out, torch.get_num_threads())
    return out.reshape(x.shape).to(x.dtype)


@hadamard.register_fake
def _hadamard_fake(x, block):
    check_hadamard_args(x, block)
    return torch.empty_like(x)


def check_trellis_args(x, trellis, su, sv, bias, bits, codebook, had_in, had_out) -> None:
    check_bits(bits)
    if codebook not in CODEBOOKS:
        raise ValueError(f"trellis_matmul: unknown codebook {codebook!r}; choose from {CODEBOOKS}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"trellis_matmul: activations must be float32, float16 or bfloat16, got {x.dtype}")
    if trellis.dtype != torch.int32 or trellis.dim() != 3 or trellis.shape[2] != 8 * bits:
        raise ValueError(f"trellis_matmul: trellis must be int32 [N/16, K/16, {8 * bits}], "
                         f"got {trellis.dtype} {tuple(trellis.shape)}")
    n, k = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if x.shape[-1] != k:
        raise ValueError(f"trellis_matmul: x has K={x.shape[-1]} input features, the weight has {k}")
    if su.dtype != torch.float16 or tuple(su.shape) != (k,) or sv.dtype != torch.float16 or tuple(sv.shape) != (n,):
        raise ValueError(f"trellis_matmul: su must be float16 [{k}] and sv float16 [{n}], "
                         f"got {su.dtype} {tuple(su.shape)} and {sv.dtype} {tuple(sv.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"trellis_matmul: bias must have shape ({n},), got {tuple(bias.shape)}")
    for block, dim, what in ((had_in, k, "had_in"), (had_out, n, "had_out")):
        if block <= 0 or block & (block - 1) or dim % block:
            raise ValueError(f"trellis_matmul: {what}={block} must be a power of two dividing {dim}")
    for arg_name, t in (("trellis", trellis), ("su", su), ("sv", sv), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"trellis_matmul: {arg_name} is on {t.device} but x is on {x.device}")


def reference_trellis_matmul(x, trellis, su, sv, bias, bits, codebook, had_in, had_out) -> torch.Tensor:
    """Decode ``Q`` in pure torch and apply the transforms around a float32 matmul."""
    check_trellis_args(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)
    q = untile(decode_tiles(trellis.cpu(), bits, codebook)).to(x.device)
    z = hadamard_transform(x.float() * su.float(), had_in) @ q.T
    y = hadamard_transform(z, had_out) * sv.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("metal_marlin::trellis_matmul", mutates_args=())
def trellis_matmul(
    x: torch.Tensor,
    trellis: torch.Tensor,
    su: torch.Tensor,
    sv: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    codebook: str,
    had_in: int,
    had_out: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a trellis-coded ``W = diag(sv) H_out Q H_in diag(su)``."""
    return reference_trellis_matmul(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)


@trellis_matmul.register_kernel("cpu")
def _trellis_matmul_cpu(x, trellis, su, sv, bias, bits, codebook, had_in, had_out):
    check_trellis_args(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)
    lead, k, n = x.shape[:-1], x.shape[-1], trellis.shape[0] * TILE
    threads = torch.get_num_threads()
    xs = (x.reshape(-1, k).float() * su.float()).contiguous()
    if xs.shape[0] == 0:
        return x.new_empty((*lead, n))
    _core.hadamard(xs, had_in, xs, threads)
    z = torch.empty(xs.shape[0], n, dtype=torch.float32)
    _core.trellis_matmul(xs, trellis.contiguous(), z, bits, codebook, threads)
    _core.hadamard(z, had_out, z, threads)
    y = z * sv.float()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, n)


@trellis_matmul.register_fake
def _trellis_matmul_fake(x, trellis, su, sv, bias, bits, codebook, had_in, had_out):
    check_trellis_args(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)
    return x.new_empty((*x.shape[:-1], trellis.shape[0] * TILE))
