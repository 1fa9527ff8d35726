"""Every CPU path of the trellis kernels (scalar, AVX2, AVX-512, switched with ``set_simd_level``) against
the pure-torch decoder of metal_marlin.formats.trellis (itself checked against the spec in
tests/formats/test_trellis.py) and against each other: the matmul decodes every weight bit-exactly and
sums in float32; the Viterbi encoder returns the same bit streams on every path."""

import numpy as np
import pytest
import torch
from test_quant_matmul import SIMD_LEVELS

from metal_marlin import _core
from metal_marlin.formats.trellis import CODEBOOKS, decode_tiles, untile


def available_trellis_paths() -> list[str]:
    """The distinct trellis paths this machine runs (a level's path can fall back to a lower one)."""
    paths = []
    previous = _core.simd_level()
    try:
        for level in SIMD_LEVELS:
            _core.set_simd_level(level)
            if _core.trellis_simd_level() not in paths:
                paths.append(_core.trellis_simd_level())
    finally:
        _core.set_simd_level(previous)
    return paths


TRELLIS_PATHS = available_trellis_paths()


@pytest.fixture(params=TRELLIS_PATHS)
def trellis_path(request):
    """Runs the test on the trellis path `request.param`, restoring the previous level."""
    previous = _core.set_simd_level(request.param)
    try:
        assert _core.trellis_simd_level() == request.param
        yield request.param
    finally:
        _core.set_simd_level(previous)


def random_streams(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**32, size=(n // 16, k // 16, 8 * bits), dtype=np.uint64)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def core_matmul(x: torch.Tensor, packed: torch.Tensor, bits: int, codebook: str, n_threads: int = 2) -> torch.Tensor:
    out = torch.full((x.shape[0], packed.shape[0] * 16), float("nan"))
    _core.trellis_matmul(x, packed, out, bits, codebook, n_threads)
    return out


def test_levels_switch_the_trellis_path():
    """The AVX2 and scalar levels run those trellis paths; the AVX-512 levels run AVX-512 if the CPU has
    the extensions the trellis kernels need (FP16, VBMI, VBMI2), else AVX2."""
    previous = _core.simd_level()
    try:
        for level in SIMD_LEVELS:
            _core.set_simd_level(level)
            assert _core.trellis_simd_level() in (("avx512", "avx2") if level.startswith("avx512") else (level,))
    finally:
        _core.set_simd_level(previous)


# One-hot rows of x pick single weights: out[m, :] = Q[:, col_m] exactly (the other products are
# zeros), so any decoding error shows bit for bit. M <= 8 runs the GEMV, M > 8 the GEMM.
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_matmul_decodes_every_weight_exactly(trellis_path, bits, codebook):
    n, k = 48, 288  # 18 tiles along K: one full 256-column GEMM panel and a short one
    packed = random_streams(n, k, bits, seed=bits)
    q = untile(decode_tiles(packed, bits, codebook))
    eye = torch.eye(k)
    torch.testing.assert_close(core_matmul(eye, packed, bits, codebook), q.T, rtol=0, atol=0)
    for m in (1, 3, 8):
        cols = torch.randperm(k, generator=torch.Generator().manual_seed(m))[:m]
        torch.testing.assert_close(core_matmul(eye[cols], packed, bits, codebook, n_threads=1), q.T[cols],
                                   rtol=0, atol=0)


# Random x: float32 sums of exact products, within the standard bound of any summation order,
# |error| <= gamma_K * sum_k |x_k q_k| with gamma_K ~ K * 2^-24.
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 17, 40])
@pytest.mark.parametrize(("bits", "codebook"), [(2, "3inst"), (3, "mcg"), (4, "3inst"), (5, "1mad"), (6, "mul1")])
def test_matmul_matches_float64(trellis_path, m, bits, codebook):
    n, k = 64, 400
    packed = random_streams(n, k, bits, seed=100 + m)
    q = untile(decode_tiles(packed, bits, codebook)).double()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = x.double() @ q.T
    bound = 1.01 * k * 2.0**-24 * (x.double().abs() @ q.abs().T)
    err = (core_matmul(x, packed, bits, codebook).double() - want).abs()
    assert torch.all(err <= bound), f"max error / bound {(err / bound).max().item():.3f}"


def encode_on_path(path: str, targets: torch.Tensor, bits: int, codebook: str) -> tuple[torch.Tensor, torch.Tensor]:
    previous = _core.set_simd_level(path)
    try:
        assert _core.trellis_simd_level() == path
        packed = torch.empty(targets.shape[0], 8 * bits, dtype=torch.int32)
        values = torch.empty(targets.shape[0], 256)
        _core.trellis_quantize(targets, bits, codebook, packed, values, 2)
    finally:
        _core.set_simd_level(previous)
    return packed, values


# The SIMD encoders are exact reorganisations of the scalar one (same candidate arithmetic, same
# first-minimum tie break), so the streams must match bit for bit. The tiles: Gaussian targets, a
# constant (many equal-cost paths), and codebook values themselves (zero-cost paths, exact ties).
@pytest.mark.parametrize(("bits", "codebook"), [(1, "mul1"), (2, "3inst"), (3, "1mad"), (4, "mcg"), (8, "3inst")])
def test_viterbi_paths_return_the_same_streams(bits, codebook):
    g = torch.Generator().manual_seed(bits)
    table = torch.empty(65536)
    _core.trellis_codebook(codebook, table)
    targets = torch.stack([torch.randn(256, generator=g) * 1.2, torch.full((256,), 0.5),
                           table[torch.randint(0, 65536, (256,), generator=g)]])
    packed, values = encode_on_path("scalar", targets, bits, codebook)
    assert torch.equal(values, decode_tiles(packed, bits, codebook))
    for path in TRELLIS_PATHS[:-1]:
        other_packed, other_values = encode_on_path(path, targets, bits, codebook)
        assert torch.equal(other_packed, packed), f"{path} differs from scalar"
        assert torch.equal(other_values, values)
