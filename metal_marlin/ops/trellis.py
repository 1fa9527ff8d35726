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
from . import metal
from .metal import Launch, ParamsStruct, cdiv

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


# ---- Metal (shaders/hadamard.metal, shaders/trellis.metal; params: their structs) -----------------------

HADAMARD_THREADS, HADAMARD_CHUNK = 128, 512  # kHadamardThreads, kHadamardChunk: 4 elements per thread
HADAMARD_BLOCKS = tuple(2**i for i in range(10))  # the instantiated blocks, 1 .. 512
TRELLIS_THREADS, TRELLIS_GEMV_MAX_M, TRELLIS_GEMM_BM, TRELLIS_GEMM_BN = 128, 8, 64, 64
HadamardParams = ParamsStruct("HadamardParams", (("uint", "rows"), ("uint", "n"), ("uint", "has_bias")))
TrellisMatmulParams = ParamsStruct("TrellisMatmulParams", (("uint", "m"), ("uint", "n"), ("uint", "k")))


def hadamard_kernel(kind: str, block: int) -> str:
    """``kind``: "half" / "float" (the op), "in" (x * su -> float32 xs) or "out" (z -> half y * sv + bias)."""
    return f"hadamard_{kind}_{block}"


def trellis_matmul_kernel(codebook: str, bits: int, m: int) -> str:
    return f"trellis_{'gemv' if m <= TRELLIS_GEMV_MAX_M else 'gemm'}_{codebook}_{bits}"


METAL_KERNELS = (
    *(hadamard_kernel(kind, block) for kind in ("half", "float", "in", "out") for block in HADAMARD_BLOCKS),
    *(trellis_matmul_kernel(codebook, bits, m) for codebook in CODEBOOKS for bits in range(1, 9)
      for m in (1, TRELLIS_GEMV_MAX_M + 1)),
)


def _hadamard_launch(kind: str, block: int, rows: int, n: int, buffers: dict[int, torch.Tensor],
                     has_bias: bool = False) -> Launch:
    params = HadamardParams.pack(rows=rows, n=n, has_bias=int(has_bias))
    return Launch(hadamard_kernel(kind, block), (cdiv(rows * n, HADAMARD_CHUNK), 1, 1), (HADAMARD_THREADS, 1, 1),
                  buffers, {len(buffers): params})


def hadamard_launches(x: torch.Tensor, out: torch.Tensor, block: int) -> list[Launch]:
    """``out = hadamard(x, block)`` on the GPU: x and out contiguous, both float16 or both float32."""
    kind = "half" if x.dtype == torch.float16 else "float"
    n = x.shape[-1]
    return [_hadamard_launch(kind, block, x.numel() // n, n, {0: x, 1: out})]


def trellis_matmul_launches(x: torch.Tensor, trellis: torch.Tensor, su: torch.Tensor, sv: torch.Tensor,
                            bias: torch.Tensor | None, out: torch.Tensor, bits: int, codebook: str, had_in: int,
                            had_out: int) -> list[Launch]:
    """``out [M, N] = trellis_matmul(x [M, K], ...)`` on the GPU in three dispatches, like the CPU kernel:
    hadamard_in (x * su, float32 xs), the trellis GEMV/GEMM (float32 z), hadamard_out (* sv + bias, half).
    x, su, sv, bias and out float16, contiguous; the float32 intermediates are allocated here."""
    m, k = x.shape
    n = out.shape[1]
    xs = torch.empty((m, k), dtype=torch.float32, device=x.device)
    z = torch.empty((m, n), dtype=torch.float32, device=x.device)
    gemv = m <= TRELLIS_GEMV_MAX_M
    grid = (n // TILE, 1, 1) if gemv else (cdiv(n, TRELLIS_GEMM_BN), cdiv(m, TRELLIS_GEMM_BM), 1)
    matmul = Launch(trellis_matmul_kernel(codebook, bits, m), grid, (TRELLIS_THREADS, 1, 1),
                    {0: xs, 1: trellis, 2: z}, {3: TrellisMatmulParams.pack(m=m, n=n, k=k)})
    return [_hadamard_launch("in", had_in, m, k, {0: x, 1: su, 2: xs}),
            matmul,
            _hadamard_launch("out", had_out, m, n, {0: z, 1: sv, 2: sv if bias is None else bias, 3: out},
                             has_bias=bias is not None)]


def hadamard_metal(x: torch.Tensor, block: int) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``). float16
    runs with half I/O, float32 and bfloat16 with float32 I/O; the transform is float32 inside."""
    check_hadamard_args(x, block)
    if block not in HADAMARD_BLOCKS:
        return hadamard_transform(x.float(), block).to(x.dtype)
    x2 = metal.metal_input(x, torch.float16 if x.dtype == torch.float16 else torch.float32)
    out = torch.empty_like(x2)
    if out.numel():
        metal.dispatch(hadamard_launches(x2, out, block))
    return out.to(x.dtype)


def trellis_matmul_metal(x: torch.Tensor, trellis: torch.Tensor, su: torch.Tensor, sv: torch.Tensor,
                         bias: torch.Tensor | None, bits: int, codebook: str, had_in: int,
                         had_out: int) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``). The
    kernels take float16 activations: float32/bfloat16 x is converted, and the result back."""
    check_trellis_args(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)
    if had_in not in HADAMARD_BLOCKS or had_out not in HADAMARD_BLOCKS:
        return reference_trellis_matmul(x, trellis, su, sv, bias, bits, codebook, had_in, had_out)
    lead, k, n = x.shape[:-1], x.shape[-1], trellis.shape[0] * TILE
    half = torch.float16
    x2 = metal.metal_input(x.reshape(-1, k), half)
    out = torch.empty((x2.shape[0], n), dtype=half, device=x.device)
    if out.numel():
        metal.dispatch(trellis_matmul_launches(
            x2, metal.metal_input(trellis, torch.int32), metal.metal_input(su, half), metal.metal_input(sv, half),
            None if bias is None else metal.metal_input(bias, half), out, bits, codebook, had_in, had_out))
    return out.to(x.dtype).reshape(*lead, n)


if _core.has_metal():
    hadamard.register_kernel("mps")(hadamard_metal)
    trellis_matmul.register_kernel("mps")(trellis_matmul_metal)
