"""shaders/trellis.metal (trellis GEMV and GEMM) in the MSL simulator.

End to end, every kernel runs inside the host composition csrc/metal uses (``trellis_matmul_msl``
below): hadamard_in (hadamard.metal) -> trellis_gemv / trellis_gemm -> hadamard_out, compared with the
reference op ``reference_trellis_matmul`` (float32 torch math) on weights from the project's quantizer.
The decode tests call the matmul kernels alone with one-hot activation rows: every output is then one
exact product 1 * q plus exact zeros, so the kernels must return the reference's decoded float32 ``Q``
bit for bit; one test feeds every one of the 65536 states through each codebook.
"""

from functools import cache

import numpy as np
import pytest
import torch

from metal_marlin.formats.trellis import CODEBOOKS, codebook_values, decode_tiles, pack_states, untile
from metal_marlin.ops.trellis import reference_trellis_matmul
from metal_marlin.quant import quantize_weight
from tests.metal.msl_testing import HALF_SUBNORMAL_SPACING, SHADERS, UNIT_ROUNDOFF_F16, UNIT_ROUNDOFF_F32
from tests.mslsim import compile_metal

BITS = range(1, 9)

GEMV_KERNELS = [f"trellis_gemv_{cb}_{bits}" for cb in CODEBOOKS for bits in BITS]
GEMM_KERNELS = [f"trellis_gemm_{cb}_{bits}" for cb in CODEBOOKS for bits in BITS]
KERNELS = GEMV_KERNELS + GEMM_KERNELS

# Launch geometry (trellis.metal, hadamard.metal).
THREADS = 128
GEMV_MAX_M = 8
GEMM_BM, GEMM_BN = 64, 64
HADAMARD_CHUNK = 512
MATMUL_PARAMS = np.dtype([("m", np.uint32), ("n", np.uint32), ("k", np.uint32)])
HADAMARD_PARAMS = np.dtype([("rows", np.uint32), ("n", np.uint32), ("has_bias", np.uint32)])

# One quantized weight per (codebook, bits): N = 48 leaves the GEMM's 64-column block with 3 of its 4
# tile rows; K_in = 128 gives had_in = 128 (the quantizer's cap) and had_out = 16. (M, bias) cases:
# GEMV rows 1 and 5 of its 8; GEMM M = 70 spans a full and a ragged 64-row block.
N, K_IN = 48, 128
GEMV_CASES = [(1, True), (5, False)]
GEMM_CASES = [(9, False), (70, True)]


@pytest.fixture(scope="module")
def lib():
    return compile_metal(SHADERS / "trellis.metal")


@pytest.fixture(scope="module")
def hadamard_lib():
    return compile_metal(SHADERS / "hadamard.metal")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def codebook_and_bits(kernel: str) -> tuple[str, int]:
    _, _, codebook, bits = kernel.split("_")
    return codebook, int(bits)


def run_matmul(lib, kernel: str, xs: np.ndarray, trellis: torch.Tensor) -> np.ndarray:
    """z = xs @ Q^T (float32 [M, N]) from one launch of a trellis_gemv / trellis_gemm kernel."""
    m, k = xs.shape
    n = trellis.shape[0] * 16
    if kernel.startswith("trellis_gemv_"):
        assert m <= GEMV_MAX_M
        grid = (n // 16, 1, 1)
    else:
        grid = (cdiv(n, GEMM_BN), cdiv(m, GEMM_BM), 1)
    z = np.full((m, n), np.nan, np.float32)
    params = np.array([(m, n, k)], MATMUL_PARAMS)[0]
    lib.run(kernel, grid=grid, threadgroup=(THREADS, 1, 1), schedule="all",
            buffers={0: np.ascontiguousarray(xs, np.float32), 1: trellis.contiguous().numpy().view(np.uint32),
                     2: z, 3: params})
    return z


def trellis_matmul_msl(lib, hadamard_lib, kernel: str, x: torch.Tensor, tw,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (half [M, N]) = hadamard_out(kernel(hadamard_in(x * su))) * sv + bias: the three dispatches the
    Metal host issues for trellis_matmul (x half [M, K_in]). Returns (xs, z, y)."""
    m, k = x.shape
    n = tw.shape[0]
    xs = np.full((m, k), np.nan, np.float32)
    run_hadamard(hadamard_lib, f"hadamard_in_{tw.had_in}", m, k, {0: x.numpy(), 1: tw.su.numpy(), 2: xs})
    z = run_matmul(lib, kernel, xs, tw.trellis)
    y = np.full((m, n), np.nan, np.float16)
    bias_buffer = np.zeros(1, np.float16) if bias is None else bias.numpy()  # bound but unread without bias
    run_hadamard(hadamard_lib, f"hadamard_out_{tw.had_out}", m, n, {0: z, 1: tw.sv.numpy(), 2: bias_buffer, 3: y},
                 has_bias=bias is not None)
    return torch.from_numpy(xs), torch.from_numpy(z), torch.from_numpy(y)


def run_hadamard(hadamard_lib, kernel: str, rows: int, n: int, buffers: dict, has_bias: bool = False) -> None:
    params = np.array([(rows, n, int(has_bias))], HADAMARD_PARAMS)[0]
    hadamard_lib.run(kernel, grid=(cdiv(rows * n, HADAMARD_CHUNK), 1, 1), threadgroup=(THREADS, 1, 1),
                     buffers={**buffers, max(buffers) + 1: params}, schedule="all")


@cache
def quantized(codebook: str, bits: int, n: int, k: int):
    """A trellis weight from the project's quantizer (Viterbi encoder, random incoherence signs)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1000 * bits + n + k))
    return quantize_weight(w, "trellis", bits=bits, codebook=codebook)


def abs_hadamard(v: torch.Tensor, block: int) -> torch.Tensor:
    """|H_b / sqrt(b)| @ |v| per block of the last dimension."""
    blocks = v.abs().reshape(*v.shape[:-1], -1, block)
    return (blocks.sum(dim=-1, keepdim=True) / block**0.5).expand_as(blocks).reshape(v.shape)


def error_bound(x: torch.Tensor, tw, bias: torch.Tensor | None) -> torch.Tensor:
    """First-order bound (float64) on |kernel's float32 pipeline - reference's float32 pipeline| before
    the final rounding to half. Each stage is a sum of products computed in a different order by the
    two: both lie within (n + 2) u32 of the exact sum relative to the magnitudes of its n terms (+2:
    the scale multiplies), and earlier errors propagate through |H| and |Q|."""
    gamma = lambda terms: 2 * (terms + 2) * UNIT_ROUNDOFF_F32  # noqa: E731
    q = tw.decoded().double().abs()
    scaled = (x.double() * tw.su.double()).abs()
    xs_mag = abs_hadamard(scaled, tw.had_in)
    xs_err = gamma(tw.had_in) * xs_mag
    z_mag = xs_mag @ q.T
    z_err = xs_err @ q.T + gamma(q.shape[1]) * z_mag
    sv = tw.sv.double().abs()
    y_err = (abs_hadamard(z_err, tw.had_out) + gamma(tw.had_out) * abs_hadamard(z_mag, tw.had_out)) * sv
    if bias is not None:
        y_err = y_err + UNIT_ROUNDOFF_F32 * (abs_hadamard(z_mag, tw.had_out) * sv + bias.double().abs())
    return y_err


def check_against_reference(lib, hadamard_lib, kernel: str, m: int, n: int, k: int, with_bias: bool) -> None:
    codebook, bits = codebook_and_bits(kernel)
    tw = quantized(codebook, bits, n, k)
    x = torch.randn(m, k).half()
    bias = torch.randn(n).half() if with_bias else None
    xs, z, y = trellis_matmul_msl(lib, hadamard_lib, kernel, x, tw, bias)

    # The matmul stage alone, on the kernel's own xs: within (K_in + 2) u32 of the exact float64 product
    # relative to the magnitudes of its terms (a tight check; the end-to-end bound below compounds).
    q = tw.decoded().double()
    z_exact = xs.double() @ q.T
    z_tol = (k + 2) * UNIT_ROUNDOFF_F32 * (xs.double().abs() @ q.abs().T)
    assert ((z.double() - z_exact).abs() <= z_tol).all(), f"{kernel} M={m}: z differs from xs @ Q^T"

    ref = reference_trellis_matmul(x.float(), tw.trellis, tw.su, tw.sv, None if bias is None else bias.float(),
                                   bits, codebook, tw.had_in, tw.had_out)
    float_error = error_bound(x, tw, bias)
    tol = UNIT_ROUNDOFF_F16 * (ref.double().abs() + float_error) + float_error + HALF_SUBNORMAL_SPACING / 2
    assert torch.isfinite(y).all(), "non-finite output (an unwritten NaN-filled element?)"
    err = (y.double() - ref.double()).abs()
    worst = int(torch.argmax(err - tol))
    assert (err <= tol).all(), (f"{kernel} M={m} {n}x{k}: |y - ref| exceeds the bound at flat index {worst}: "
                                f"y={y.flatten()[worst]} ref={ref.flatten()[worst]} tol={tol.flatten()[worst]}")


def test_every_kernel_is_instantiated(lib):
    assert sorted(lib.kernel_names) == sorted(KERNELS)


@pytest.mark.parametrize("kernel", GEMV_KERNELS)
def test_gemv_matches_reference(lib, hadamard_lib, kernel):
    for m, with_bias in GEMV_CASES:
        check_against_reference(lib, hadamard_lib, kernel, m, N, K_IN, with_bias)


@pytest.mark.parametrize("kernel", GEMM_KERNELS)
def test_gemm_matches_reference(lib, hadamard_lib, kernel):
    for m, with_bias in GEMM_CASES:
        check_against_reference(lib, hadamard_lib, kernel, m, N, K_IN, with_bias)


def random_streams(bits: int, n: int, k: int, seed: int) -> torch.Tensor:
    """int32 [N/16, K/16, 8*bits] of uniformly random words: every state, wrap and bit offset occurs."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**32, size=(n // 16, k // 16, 8 * bits), dtype=np.uint64)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_is_bit_exact(lib, kernel):
    """One-hot rows of xs read columns of Q back exactly. GEMM: xs = identity [K_in, K_in], all of Q^T
    in one launch (N = 80: a ragged second column block, K_in = 48: 3 tile columns). GEMV: 8 one-hot
    rows at columns chosen across tile columns and both lane halves of a tile row."""
    codebook, bits = codebook_and_bits(kernel)
    n, k = 80, 48
    trellis = random_streams(bits, n, k, seed=bits)
    q = untile(decode_tiles(trellis, bits, codebook))
    if kernel.startswith("trellis_gemm_"):
        z = run_matmul(lib, kernel, np.eye(k, dtype=np.float32), trellis)
        assert torch.equal(torch.from_numpy(z), q.T)
    else:
        cols = [0, 7, 8, 15, 16 + 3, 16 + 12, 32 + 5, 32 + 14]
        xs = np.eye(k, dtype=np.float32)[cols]
        z = run_matmul(lib, kernel, xs, trellis)
        assert torch.equal(torch.from_numpy(z), q.T[cols])


def every_state_streams() -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit tile streams whose 512 x 256 states are all 65536 states: tile (a, h) alternates the byte a
    with the bytes 128h .. 128h+127, so its states (a << 8 | b) and (b << 8 | a) cover b in that half
    (the ring closes with (128h+127, a)). Returns (states [512, 256], packed [512, 1, 64]): one tile
    column, so a single K step of the GEMM decodes them all."""
    a = torch.arange(256).repeat_interleave(2)  # tile index 2a + h
    h = torch.arange(2).repeat(256)
    t = torch.arange(256)
    new_bytes = torch.where(t % 2 == 0, a[:, None], 128 * h[:, None] + t // 2)  # [512, 256]
    states = (torch.roll(new_bytes, 1, dims=1) << 8) | new_bytes
    return states, pack_states(states, 8).reshape(512, 1, 64)


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_every_state_decodes_exactly(lib, codebook):
    """All 65536 states through trellis_gemm_<codebook>_8 with xs = identity [16, 16] against the
    reference codebook (1mad's float32 division included)."""
    states, packed = every_state_streams()
    assert torch.equal(torch.unique(states), torch.arange(65536))
    q = untile(decode_tiles(packed, 8, codebook))
    assert torch.equal(untile(codebook_values(codebook)[states].reshape(512, 1, 256)), q)
    z = run_matmul(lib, f"trellis_gemm_{codebook}_8", np.eye(16, dtype=np.float32), packed)
    assert torch.equal(torch.from_numpy(z), q.T)
