"""shaders/hadamard.metal (blockwise normalised Hadamard transforms) in the MSL simulator, against the
reference transform of ``metal_marlin::hadamard`` (``hadamard_transform``: float32 torch math) and the
input / output sides of ``reference_trellis_matmul`` (``hadamard(x * su)`` and ``hadamard(z) * sv + bias``).
"""


import numpy as np
import pytest
import torch

from metal_marlin.formats.hadamard import hadamard_transform
from tests.metal.msl_testing import HALF_SUBNORMAL_SPACING, SHADERS, UNIT_ROUNDOFF_F16, UNIT_ROUNDOFF_F32
from tests.mslsim import compile_metal

SHADER = SHADERS / "hadamard.metal"

BLOCKS = [2**i for i in range(10)]  # 1 .. 512
VARIANTS = ("half", "float", "in", "out")
KERNELS = [f"hadamard_{variant}_{block}" for variant in VARIANTS for block in BLOCKS]

# Launch geometry (hadamard.metal): 128 threads transform 512 consecutive elements.
THREADS = 128
CHUNK = 512
PARAMS = np.dtype([("rows", np.uint32), ("n", np.uint32), ("has_bias", np.uint32)])


@pytest.fixture(scope="module")
def lib():
    return compile_metal(SHADER)


def shapes(block: int) -> list[tuple[int, int]]:
    """(rows, n): several blocks per row, a row count that leaves the last 512-element chunk partly
    empty, and for small blocks the 576 = 9 x 64 width of SmolLM2 (n not a power of two)."""
    cases = [(3, 3 * block), (1, block)]
    if block <= 64:
        cases.append((2, 576))
    return cases


def launch(lib, kernel: str, rows: int, n: int, buffers: dict, has_bias: bool = False) -> None:
    params = np.array([(rows, n, int(has_bias))], PARAMS)[0]
    last = max(buffers) + 1
    lib.run(kernel, grid=(-(-rows * n // CHUNK), 1, 1), threadgroup=(THREADS, 1, 1),
            buffers={**buffers, last: params}, schedule="all")


def abs_hadamard(v: torch.Tensor, block: int) -> torch.Tensor:
    """|H_b / sqrt(b)| @ |v| per block: every output of a block has magnitude sum|v_block| / sqrt(b)."""
    blocks = v.abs().double().reshape(*v.shape[:-1], -1, block)
    return (blocks.sum(dim=-1, keepdim=True) / block**0.5).expand_as(blocks).reshape(v.shape)


def assert_within(y: torch.Tensor, ref: torch.Tensor, float_error: torch.Tensor, half_output: bool) -> None:
    """|y - ref| <= float_error (both computed in float32 in different orders), plus the rounding of
    the kernel's float32 result to half when the output is half."""
    tol = float_error
    if half_output:
        tol = UNIT_ROUNDOFF_F16 * (ref.abs() + float_error) + float_error + HALF_SUBNORMAL_SPACING / 2
    y = y.float()
    assert torch.isfinite(y).all(), "non-finite output (an unwritten NaN-filled element?)"
    err = (y.double() - ref.double()).abs()
    worst = int(torch.argmax(err - tol))
    assert (err <= tol).all(), (f"|y - ref| exceeds the bound at flat index {worst}: y={y.flatten()[worst]} "
                                f"ref={ref.flatten()[worst]} tol={tol.flatten()[worst]}")


def sum_error(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """Two float32 evaluations of a b-term sum of products (the reference's matmul with float32 entries
    of H/sqrt(b); the kernel's butterflies and one final multiply) each lie within (b + 1) u32 of the
    exact value, relative to the sum of the terms' magnitudes; one more u32 for a scale multiply."""
    return 2 * (block + 2) * UNIT_ROUNDOFF_F32 * magnitude


def test_every_kernel_is_instantiated(lib):
    assert sorted(lib.kernel_names) == sorted(KERNELS)


def variant_and_block(kernel: str) -> tuple[str, int]:
    _, variant, block = kernel.split("_")
    return variant, int(block)


@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_reference(lib, kernel):
    variant, block = variant_and_block(kernel)
    for rows, n in shapes(block):
        x = torch.randn(rows, n)
        if variant in ("half", "float"):
            dtype = torch.float16 if variant == "half" else torch.float32
            x = x.to(dtype)
            y = np.full((rows, n), np.nan, x.numpy().dtype)
            launch(lib, kernel, rows, n, {0: x.numpy(), 1: y})
            ref = hadamard_transform(x.float(), block)
            assert_within(torch.from_numpy(y), ref, sum_error(abs_hadamard(x, block), block), variant == "half")
        elif variant == "in":
            x = x.half()
            su = (torch.randint(0, 2, (n,)) * 2 - 1).half() * (0.5 + torch.rand(n)).half()
            xs = np.full((rows, n), np.nan, np.float32)
            launch(lib, kernel, rows, n, {0: x.numpy(), 1: su.numpy(), 2: xs})
            scaled = x.float() * su.float()
            ref = hadamard_transform(scaled, block)
            assert_within(torch.from_numpy(xs), ref, sum_error(abs_hadamard(scaled, block), block), False)
        else:
            z = x.float()
            sv = (torch.randn(n) * 0.3).half()
            for bias in (torch.randn(n).half(), None):
                y = np.full((rows, n), np.nan, np.float16)
                bias_buffer = np.zeros(1, np.float16) if bias is None else bias.numpy()
                launch(lib, kernel, rows, n, {0: z.numpy(), 1: sv.numpy(), 2: bias_buffer, 3: y},
                       has_bias=bias is not None)
                ref = hadamard_transform(z, block) * sv.float()
                magnitude = abs_hadamard(z, block) * sv.double().abs()
                if bias is not None:
                    ref = ref + bias.float()
                    magnitude = magnitude + bias.double().abs()
                assert_within(torch.from_numpy(y), ref, sum_error(magnitude, block), True)


@pytest.mark.parametrize("block", [8, 128, 512])
def test_unit_vectors_give_the_sylvester_rows(lib, block):
    """Unit vector e_i transforms to row i of H_b / sqrt(b): the sign pattern (-1)^popcount(i & j)
    exactly, every entry the same float32 constant 1/sqrt(b) (butterflies of a unit vector are exact)."""
    rows = sorted({0, 1, block // 2, block - 1, *torch.randint(0, block, (12,)).tolist()})
    x = torch.eye(block, dtype=torch.float32)[rows]
    y = np.full((len(rows), block), np.nan, np.float32)
    launch(lib, f"hadamard_float_{block}", len(rows), block, {0: x.numpy(), 1: y})
    cols = torch.arange(block)
    parity = torch.tensor([[bin(i & j).count("1") % 2 for j in cols.tolist()] for i in rows])
    y = torch.from_numpy(y)
    assert torch.equal(y.sign(), (1 - 2 * parity).float())
    assert torch.equal(y.abs(), torch.full_like(y, y[0, 0].item()))
    assert y[0, 0].item() == pytest.approx(block**-0.5, rel=UNIT_ROUNDOFF_F32)
