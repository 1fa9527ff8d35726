"""shaders/quant_matmul.metal (group-quantized GEMV and GEMM) in the MSL simulator, against the
reference op ``reference_quant_matmul`` (float32 torch math on the same half inputs).

Weights come from the project's quantizer (``quantize_weight``) for the matmul tests; the decode test
packs every code of each format by hand and reads the dequantized weights back through the kernels
with one-hot activation rows, which must reproduce the reference's float32 weights rounded to half
exactly (the products are exact and every other term of the sums is zero).
"""


import numpy as np
import pytest
import torch

from metal_marlin.formats import FORMATS, n_groups
from metal_marlin.ops import reference_quant_matmul
from metal_marlin.ops.group_matmul import (
    QUANT_GEMM_BM,
    QUANT_GEMM_BN,
    QUANT_GEMM_THREADS,
    QUANT_GEMV_MAX_M,
    QUANT_GEMV_ROWS,
    QUANT_GEMV_THREADS,
    QuantMatmulParams,
)
from metal_marlin.ops.metal import cdiv
from metal_marlin.quant import quantize_weight
from tests.metal.msl_testing import HALF_SUBNORMAL_SPACING, SHADERS, UNIT_ROUNDOFF_F16, UNIT_ROUNDOFF_F32
from tests.mslsim import compile_metal

SHADER = SHADERS / "quant_matmul.metal"

# (format, symmetric): every group format, with its asymmetric variant where the format has one.
VARIANTS = [("int8", True), ("int8", False), ("int4", True), ("int4", False), ("int3", True), ("int3", False),
            ("int2", True), ("int2", False), ("fp4", True), ("fp8", True)]


def host_name(family: str, fmt: str, symmetric: bool) -> str:
    return f"quant_{family}_{fmt}" + ("" if symmetric else "_asym")


GEMV_KERNELS = [host_name("gemv", f, s) for f, s in VARIANTS]
GEMM_KERNELS = [host_name("gemm", f, s) for f, s in VARIANTS]
KERNELS = GEMV_KERNELS + GEMM_KERNELS
VARIANT_OF = {host_name(family, f, s): (f, s) for family in ("gemv", "gemm") for f, s in VARIANTS}

# (M, N, K, group_size, bias). N is never a multiple of the feature tile; -1 is per-channel; groups 64
# of K = 96, 96 of K = 320 and 128 of K = 3136 leave a shorter last group; M = 11 and 40 span two row
# tiles. The GEMV's 128 threads take one 32-code block each per step, so K = 3136 (98 blocks) reaches
# its fourth simdgroup and K = 4160 (130 blocks) a second step.
GEMV_SHAPES = [(1, 38, 96, 64, False), (3, 9, 4160, -1, True), (8, 13, 320, 96, True),
               (11, 6, 3136, 128, False)]
GEMM_SHAPES = [(5, 40, 96, 64, True), (17, 38, 128, -1, False), (40, 70, 320, 96, True)]


@pytest.fixture(scope="module")
def lib():
    return compile_metal(SHADER)


def run_kernel(lib, kernel: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               offsets: torch.Tensor | None, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """y [M, N] half from one launch (schedule "all") of either kernel family for any M, with the host's
    launch geometry (metal_marlin.ops.group_matmul, checked against shaders/quant_matmul.h by
    test_dispatch_names.py); x half [M, K]. Absent offsets and bias are bound as one-element buffers,
    so reading them faults at the simulator's guard page."""
    m, k = x.shape
    n = packed.shape[0]
    if kernel.startswith("quant_gemv_"):
        grid, threads = (cdiv(n, QUANT_GEMV_ROWS), cdiv(m, QUANT_GEMV_MAX_M), 1), QUANT_GEMV_THREADS
    else:
        grid, threads = (cdiv(n, QUANT_GEMM_BN), cdiv(m, QUANT_GEMM_BM), 1), QUANT_GEMM_THREADS
    unused = np.zeros(1, np.float16)
    y = np.full((m, n), np.nan, np.float16)
    params = QuantMatmulParams.pack(M=m, N=n, K=k, group_size=group_size, has_bias=int(bias is not None))
    lib.run(kernel, grid=grid, threadgroup=(threads, 1, 1), schedule="all", buffers={
        0: x.numpy(),
        1: packed.numpy().view(np.uint32),
        2: scales.numpy(),
        3: unused if offsets is None else offsets.numpy(),
        4: unused if bias is None else bias.numpy(),
        5: y,
        6: params,
    })
    return torch.from_numpy(y)


def assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, k: int) -> None:
    """Worst-case bound for half(float32 sum) against a float32 sum of the same K+1 terms in another
    order: each sum is within (K+1)*u32*S of the exact value (S = sum of |terms|), and rounding the
    kernel's result to half adds u16*|y32| (or half a subnormal step below 2^-14)."""
    accumulation = 2 * (k + 1) * UNIT_ROUNDOFF_F32 * magnitude
    tol = UNIT_ROUNDOFF_F16 * (ref.abs() + accumulation) + accumulation + HALF_SUBNORMAL_SPACING / 2
    y = y.float()
    assert torch.isfinite(y).all(), "non-finite output (an unwritten NaN-filled element?)"
    err = (y - ref).abs()
    worst = torch.argmax(err - tol)
    assert (err <= tol).all(), (
        f"|y - ref| exceeds the bound at {np.unravel_index(worst.item(), err.shape)}: "
        f"y={y.flatten()[worst]} ref={ref.flatten()[worst]} tol={tol.flatten()[worst]}"
    )


def test_every_kernel_is_instantiated(lib):
    assert sorted(lib.kernel_names) == sorted(KERNELS)


def check_matmul(lib, kernel: str, m: int, n: int, k: int, group_size: int, with_bias: bool) -> None:
    fmt, symmetric = VARIANT_OF[kernel]
    qw = quantize_weight(0.05 * torch.randn(n, k), fmt, group_size=group_size, symmetric=symmetric)
    assert qw.symmetric == symmetric
    x = torch.randn(m, k).half()
    bias = torch.randn(n).half() if with_bias else None
    y = run_kernel(lib, kernel, x, qw.packed, qw.scales, qw.offsets, bias, qw.group_size)

    ref = reference_quant_matmul(x.float(), qw.packed, qw.scales, qw.offsets,
                                 None if bias is None else bias.float(), fmt, qw.group_size)
    magnitude = x.float().abs() @ qw.dequantize(torch.float32).abs().T
    if bias is not None:
        magnitude += bias.float().abs()
    assert_close_to_reference(y, ref, magnitude, k)


@pytest.mark.parametrize("m,n,k,group_size,with_bias", GEMV_SHAPES, ids=str)
@pytest.mark.parametrize("kernel", GEMV_KERNELS)
def test_gemv_matches_reference(lib, kernel, m, n, k, group_size, with_bias):
    check_matmul(lib, kernel, m, n, k, group_size, with_bias)


@pytest.mark.parametrize("m,n,k,group_size,with_bias", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_gemm_matches_reference(lib, kernel, m, n, k, group_size, with_bias):
    check_matmul(lib, kernel, m, n, k, group_size, with_bias)


def every_code(fmt: str, n: int, k: int) -> torch.Tensor:
    """Codes [n, k] in shuffled order holding every code of the format (fp8 without its NaN codes)."""
    bits = FORMATS[fmt].bits
    u = (torch.randperm(n * k) % 2**bits).reshape(n, k)
    if fmt == "fp8":
        u = torch.where((u & 0x7F) == 0x7F, u - 1, u)
    expected = [c for c in range(2**bits) if not (fmt == "fp8" and c & 0x7F == 0x7F)]
    assert torch.unique(u).tolist() == expected
    return u


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_is_bit_exact(lib, kernel):
    """x = identity [K, K] makes y = W^T: each output is one exact product 1 * w plus exact zeros, so
    the kernel must return the reference's float32 weight rounded to half exactly (equal values; the
    sign of a zero weight, fp4 code 8, may differ). K = 96 with group 64 includes a short last group;
    N = 21 covers every code of int8/fp8 in 2016 weights. The GEMV runs here with M = 96 (12 row
    tiles), beyond the host's M <= 8, which exercises its row tiling."""
    fmt, symmetric = VARIANT_OF[kernel]
    n, k, group_size = 21, 96, 64
    packed = FORMATS[fmt].pack(every_code(fmt, n, k))
    groups = n_groups(k, group_size)
    scales = (0.01 + 0.1 * torch.rand(n, groups)).half()
    offsets = None if symmetric else (-torch.rand(n, groups)).half()
    y = run_kernel(lib, kernel, torch.eye(k).half(), packed, scales, offsets, None, group_size)

    weights_t = reference_quant_matmul(torch.eye(k), packed, scales, offsets, None, fmt, group_size)
    assert torch.equal(y, weights_t.half())
