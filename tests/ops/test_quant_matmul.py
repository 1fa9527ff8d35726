"""``metal_marlin::quant_matmul`` (CPU kernel, op, reference op) against a float64 oracle built from
docs/formats.md (the ``spec`` fixture in tests/conftest.py): ``y = x.double() @ W.T + bias``."""

import numpy as np
import pytest
import torch

import metal_marlin as mm
from metal_marlin import _core
from metal_marlin.ops import quant_matmul, reference_quant_matmul

OP = torch.ops.metal_marlin.quant_matmul

FORMAT_CASES = [("int2", True), ("int2", False), ("int3", True), ("int3", False), ("int4", True),
                ("int4", False), ("int8", True), ("int8", False), ("fp4", True), ("fp8", True)]
# M, K, N, group_size: K and N not powers of two; (8, 320, 1, 320) is per-channel (group = K); the
# last two have a shorter last group (576 = 4*128 + 64, the SmolLM2 hidden size; 96 = 64 + 32).
SHAPES = [(1, 96, 7, 32), (3, 384, 200, 128), (8, 320, 1, 320), (9, 256, 200, 64), (17, 96, 200, 32),
          (64, 384, 7, 128), (5, 576, 33, 128), (3, 96, 200, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative rounding of one output element in the activation dtype (twice the unit roundoff).
OUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# float32 accumulation of K <= 576 products: far below this, relative to max|ref|.
ACCUM_RTOL = 1e-5
BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8, "fp4": 4, "fp8": 8}
TYPICAL_CODE_VALUE = {"int2": 2, "int3": 4, "int4": 8, "int8": 128, "fp4": 3, "fp8": 100}
# Every kernel path this machine can run, best first: the conformance tests run on each of them in
# this process (set_simd_level), so the portable scalar path is tested even on an AVX-512 machine.
ALL_SIMD_LEVELS = ("avx512_amx", "avx512_vnni", "avx512", "avx2", "scalar")
# The paths whose int4/int8 matmuls take integer activations (see vnni_slack).
INTEGER_LEVELS = ("avx512_amx", "avx512_vnni")


def available_simd_levels():
    if not hasattr(_core, "set_simd_level"):
        return ["scalar"]
    levels = []
    previous = _core.simd_level()
    try:
        for level in ALL_SIMD_LEVELS:
            try:
                _core.set_simd_level(level)
            except ValueError:
                continue
            levels.append(level)
    finally:
        _core.set_simd_level(previous)
    return levels


SIMD_LEVELS = available_simd_levels()


@pytest.fixture(scope="module")
def core():
    assert hasattr(_core, "quant_matmul"), "C++ kernel _core.quant_matmul is not built (pip install -e .)"
    return _core


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(core, request):
    """Runs the test with the kernel path `request.param` in effect, restoring the previous one."""
    previous = core.set_simd_level(request.param)
    assert core.simd_level() == request.param
    try:
        yield request.param
    finally:
        core.set_simd_level(previous)


def n_groups(k, group_size):
    return -(-k // group_size)


def make_weight(name, symmetric, n, k, group_size):
    """Random codes (every code reachable; fp8 without its NaN codes) with random float16 scales and
    offsets such that |w| is around 0.1."""
    bits = BITS[name]
    u = torch.randint(0, 2**bits, (n, k))
    if name == "fp8":
        u = torch.where((u & 0x7F) == 0x7F, u - 1, u)
    packed = mm.FORMATS[name].pack(u)
    gshape = (n, n_groups(k, group_size))
    scales = ((0.5 + torch.rand(gshape)) * 0.1 / TYPICAL_CODE_VALUE[name]).half()
    offsets = None
    if not symmetric:
        offsets = (-scales.float() * (2**bits - 1) * (0.2 + 0.6 * torch.rand(gshape))).half()
    return packed, scales, offsets


def spec_matmul(spec, name, x, packed, scales, offsets, bias, group_size):
    """float64 ``x @ W.T + bias`` with W decoded by the spec oracle; x [..., K]."""
    w = spec.dequant(name, packed, scales, offsets, x.shape[-1], group_size)
    y = x.double().numpy() @ w.T
    if bias is not None:
        y = y + bias.double().numpy()
    return y


# The integer GEMV and GEMM (int4/int8; avx512_vnni, avx512_amx) round each activation to 16-bit fixed
# point per 32-block:
# |error| <= max|x_b| / (2 * 32639) per element (csrc/cpu/gemv.h, docs/kernels.md).
VNNI_RANGE = 32639


def vnni_slack(spec, name, x, packed, scales, offsets, group_size):
    """The activation-rounding bound sum_b max|x_b| / (2 * 32639) * sum_{i in b} |W[n, i]| of the integer
    kernels, elementwise like ``spec_matmul``'s result; 0 where the path in effect computes in float."""
    k = x.shape[-1]
    if _core.simd_level() not in INTEGER_LEVELS or name not in ("int4", "int8"):
        return 0.0
    w = np.abs(spec.dequant(name, packed, scales, offsets, k, group_size)).reshape(-1, k // 32, 32).sum(-1)
    xb = np.abs(x.double().numpy()).reshape(*x.shape[:-1], k // 32, 32).max(-1) / (2 * VNNI_RANGE)
    return xb @ w.T


def assert_close_to_spec(y, ref, dtype, slack=0.0):
    """|y - ref| <= output rounding * |ref| + ACCUM_RTOL * max|ref| + slack (elementwise). For float32 that
    is max|y - ref| / max|ref| <= 1e-5; for float16/bfloat16 ``ref`` is computed from the rounded x, and
    the output's own rounding is allowed on top. ``slack``: the activation rounding of the integer
    GEMV (``vnni_slack``)."""
    assert y.dtype == dtype
    y = y.double().numpy()
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), "non-finite output (an unwritten NaN-filled element?)"
    scale = np.abs(ref).max()
    assert scale > 0
    err = np.abs(y - ref)
    bound = OUT_ROUNDING[dtype] * np.abs(ref) + ACCUM_RTOL * scale + slack
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (
        f"max|y-ref|/max|ref| = {err.max() / scale:.3g}; worst at {worst}: y={y[worst]} ref={ref[worst]}"
    )


# -- the raw CPU kernel -------------------------------------------------------------------------------
GUARD = 7.0  # sentinel around the output, to catch writes out of bounds


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,group_size", SHAPES, ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_cpu_kernel_matches_spec(core, simd_level, spec, name, symmetric, m, k, n, group_size, dtype, with_bias):
    packed, scales, offsets = make_weight(name, symmetric, n, k, group_size)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    ref = spec_matmul(spec, name, x, packed, scales, offsets, bias, group_size)
    for n_threads in (1, 2, 3):
        pad = 5
        buf = torch.full((m * n + 2 * pad,), float("nan"), dtype=dtype)
        buf[:pad] = GUARD
        buf[-pad:] = GUARD
        out = buf[pad : pad + m * n].view(m, n)
        core.quant_matmul(x, packed, scales, offsets, bias, out, name, group_size, n_threads)
        assert (buf[:pad] == GUARD).all() and (buf[-pad:] == GUARD).all(), "wrote outside out"
        assert_close_to_spec(out, ref, dtype, vnni_slack(spec, name, x, packed, scales, offsets, group_size))


DEQ_SHAPES = [(5, 96, 32), (3, 384, 128), (4, 320, 320), (3, 576, 128), (2, 96, 64)]


@pytest.mark.parametrize("n,k,group_size", DEQ_SHAPES, ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_cpu_dequantize_matches_spec(core, simd_level, spec, name, symmetric, n, k, group_size):
    """Same tolerance as the package's dequantize (tests/formats/test_spec.py): ``s * v`` is exact in
    float32, ``s * u + o`` is one correctly rounded float32 operation away from exact."""
    packed, scales, offsets = make_weight(name, symmetric, n, k, group_size)
    out = torch.full((n, k), float("nan"))
    core.dequantize(packed, scales, offsets, out, name, group_size)
    ref = spec.dequant(name, packed, scales, offsets, k, group_size)
    if symmetric:
        np.testing.assert_array_equal(out.double().numpy(), ref)
    else:
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=2.0**-24, atol=0)


# Wider than the shapes above: several GEMM passes over K slices and activation row blocks, N not a
# multiple of any tile, and N < 32 (the GEMM then splits the activation rows between threads).
LARGE_SHAPES = [(100, 1056, 45, 128), (530, 320, 20, 64), (33, 2080, 260, 2080)]


@pytest.mark.parametrize("m,k,n,group_size", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("name,symmetric", [("int3", False), ("int4", True), ("fp8", True)], ids=str)
def test_cpu_kernel_large_shapes_match_spec(core, simd_level, spec, name, symmetric, m, k, n, group_size):
    packed, scales, offsets = make_weight(name, symmetric, n, k, group_size)
    x = torch.randn(m, k)
    ref = spec_matmul(spec, name, x, packed, scales, offsets, None, group_size)
    for n_threads in (1, 2):
        out = torch.full((m, n), float("nan"))
        core.quant_matmul(x, packed, scales, offsets, None, out, name, group_size, n_threads)
        assert_close_to_spec(out, ref, torch.float32, vnni_slack(spec, name, x, packed, scales, offsets, group_size))


def test_simd_levels_cover_the_cpu(core):
    """The process starts on the best path; 'auto' returns to it; every path below it is available."""
    best = SIMD_LEVELS[0]
    assert list(ALL_SIMD_LEVELS[ALL_SIMD_LEVELS.index(best):]) == SIMD_LEVELS
    previous = core.set_simd_level("auto")
    try:
        assert core.simd_level() == best
        assert core.set_simd_level("scalar") == best
        assert core.simd_level() == "scalar"
        assert core.set_simd_level("auto") == "scalar"
    finally:
        core.set_simd_level(previous)


@pytest.mark.parametrize("level", ["sse2", "", "AVX2"] + [lv for lv in ALL_SIMD_LEVELS if lv not in SIMD_LEVELS])
def test_set_simd_level_rejects_unknown_or_unsupported(core, level):
    before = core.simd_level()
    with pytest.raises(ValueError, match="set_simd_level"):
        core.set_simd_level(level)
    assert core.simd_level() == before


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32], ids=str)
def test_read_bandwidth_probe_reads_every_byte(core, simd_level, dtype):
    data = torch.randint(0, 256, ((1 << 21) + 37,), dtype=torch.int64).to(torch.uint8)  # chunks + tail
    buf = data if dtype == torch.uint8 else data[: data.numel() // 4 * 4].view(torch.int32)
    raw = buf.view(torch.uint8).numpy()
    # The checksum is a wrapping sum of little-endian 64-bit words plus the tail bytes; flipping one
    # byte must change it, wherever the byte is.
    base = core.read_bandwidth_probe(buf, 2)
    assert core.read_bandwidth_probe(buf, 1) == base
    for pos in (0, raw.size // 2, raw.size - 1):
        raw[pos] ^= 0x5A
        assert core.read_bandwidth_probe(buf, 2) != base
        raw[pos] ^= 0x5A
    with pytest.raises(TypeError, match="uint8 or int32"):
        core.read_bandwidth_probe(torch.zeros(8), 1)
    with pytest.raises(ValueError, match="n_threads"):
        core.read_bandwidth_probe(buf, 0)


# -- the op (torch.ops.metal_marlin.quant_matmul) ----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_op_leading_dims_matches_spec(core, spec, name, symmetric, dtype):
    k, n, g = 192, 33, 64
    packed, scales, offsets = make_weight(name, symmetric, n, k, g)
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = spec_matmul(spec, name, x, packed, scales, offsets, bias, g)
    y = OP(x, packed, scales, offsets, bias, name, g)
    assert tuple(y.shape) == (2, 3, n)
    assert_close_to_spec(y, ref, dtype, vnni_slack(spec, name, x, packed, scales, offsets, g))
    # the Python entry point is the same op
    assert torch.equal(quant_matmul(x, packed, scales, offsets, bias, name, g), y)


@pytest.mark.parametrize("m,k,n,group_size", [(1, 96, 7, 32), (17, 320, 200, 320), (5, 384, 1, 128),
                                              (4, 576, 50, 128), (2, 64, 9, 128)], ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_op_matches_spec_float32(core, spec, name, symmetric, m, k, n, group_size):
    packed, scales, offsets = make_weight(name, symmetric, n, k, group_size)
    x = torch.randn(m, k)
    ref = spec_matmul(spec, name, x, packed, scales, offsets, None, group_size)
    assert_close_to_spec(OP(x, packed, scales, offsets, None, name, group_size), ref, torch.float32,
                         vnni_slack(spec, name, x, packed, scales, offsets, group_size))


@pytest.mark.parametrize("k,group_size", [(256, 128), (576, 128)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_reference_op_matches_spec(spec, name, symmetric, dtype, k, group_size):
    n = 40
    packed, scales, offsets = make_weight(name, symmetric, n, k, group_size)
    x = torch.randn(2, 5, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    ref = spec_matmul(spec, name, x, packed, scales, offsets, bias, group_size)
    y = reference_quant_matmul(x, packed, scales, offsets, bias, name, group_size)
    assert_close_to_spec(y, ref, dtype)


@pytest.mark.parametrize("k,group_size", [(256, 64), (576, 128), (320, -1)], ids=str)
def test_op_on_quantized_weight_matches_spec(core, spec, k, group_size):
    qw = mm.quantize_weight(torch.randn(48, k), "int4", group_size=group_size)
    x = torch.randn(4, k)
    ref = spec_matmul(spec, "int4", x, qw.packed, qw.scales, qw.offsets, None, qw.group_size)
    y = OP(x, qw.packed, qw.scales, qw.offsets, None, "int4", qw.group_size)
    assert_close_to_spec(y, ref, torch.float32, vnni_slack(spec, "int4", x, qw.packed, qw.scales, qw.offsets,
                                                           qw.group_size))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_inputs(core, spec, dtype):
    m, k, n, g = 6, 128, 24, 32
    packed, scales, offsets = make_weight("int3", False, n, k, g)
    x = torch.randn(k + 32, 2 * m).to(dtype).T[::2, :k]  # transposed, then sliced
    assert tuple(x.shape) == (m, k) and not x.is_contiguous()
    bias = torch.randn(2 * n).to(dtype)[::2]
    nc = lambda t: t.T.contiguous().T  # noqa: E731  same values, transposed strides
    args = (nc(packed), nc(scales), nc(offsets), bias)
    assert not any(t.is_contiguous() for t in args)
    ref = spec_matmul(spec, "int3", x, packed, scales, offsets, bias, g)
    assert_close_to_spec(OP(x, *args, "int3", g), ref, dtype)


def test_one_dimensional_x(core, spec):
    packed, scales, offsets = make_weight("int8", True, 10, 64, 32)
    x = torch.randn(64)
    y = OP(x, packed, scales, offsets, None, "int8", 32)
    assert tuple(y.shape) == (10,)
    assert_close_to_spec(y, spec_matmul(spec, "int8", x, packed, scales, offsets, None, 32), torch.float32,
                         vnni_slack(spec, "int8", x, packed, scales, offsets, 32))


def test_empty_batch(core):
    packed, scales, offsets = make_weight("int4", False, 7, 64, 32)
    y = OP(torch.randn(0, 64), packed, scales, offsets, None, "int4", 32)
    assert tuple(y.shape) == (0, 7)
    y = OP(torch.randn(2, 0, 64, dtype=torch.float16), packed, scales, offsets, None, "int4", 32)
    assert tuple(y.shape) == (2, 0, 7) and y.dtype == torch.float16


def test_threads_setting_does_not_change_the_result(core, spec):
    packed, scales, offsets = make_weight("fp4", True, 200, 256, 32)
    x = torch.randn(9, 256)
    ref = spec_matmul(spec, "fp4", x, packed, scales, offsets, None, 32)
    old = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert_close_to_spec(OP(x, packed, scales, offsets, None, "fp4", 32), ref, torch.float32)
    finally:
        torch.set_num_threads(old)


def pack_any_k(u, bits):
    """Spec packing of 2/4/8-bit codes for a K that is not a multiple of 32 (K*bits a multiple of 32)."""
    per = 32 // bits
    u = u.numpy().astype(np.uint64).reshape(*u.shape[:-1], -1, per)
    words = (u << (np.arange(per, dtype=np.uint64) * np.uint64(bits))).sum(-1)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


# K not a multiple of 32 is outside the spec, but the packed width alone does not reveal it for
# 2/4/8 bits: such inputs must raise a clear error or be computed correctly, never silently wrong.
OFF_SPEC = [("int4", True, 40, 64), ("int8", False, 36, 32), ("fp8", True, 44, 32), ("int2", True, 48, 32)]


@pytest.mark.parametrize("name,symmetric,k,group_size", OFF_SPEC, ids=str)
def test_k_not_multiple_of_32_is_rejected_or_correct(core, spec, name, symmetric, k, group_size):
    n, bits = 9, BITS[name]
    u = torch.randint(0, 2**bits, (n, k))
    if name == "fp8":
        u = torch.where((u & 0x7F) == 0x7F, u - 1, u)
    packed = pack_any_k(u, bits)
    scales = (0.5 + torch.rand(n, n_groups(k, group_size))).half() * 0.01
    offsets = None if symmetric else (-scales.float() * 2 ** (bits - 1)).half()
    x = torch.randn(5, k)
    try:
        y = OP(x, packed, scales, offsets, None, name, group_size)
    except ValueError as err:
        assert "K=" in str(err)
        return
    assert_close_to_spec(y, spec_matmul(spec, name, x, packed, scales, offsets, None, group_size), torch.float32)


# -- torch.compile / fake tensors -----------------------------------------------------------------------
OPCHECK_CASES = [("int4", False, torch.float32, True, 64), ("int3", True, torch.float16, False, 64),
                 ("fp8", True, torch.bfloat16, True, 128), ("fp4", True, torch.float32, False, 96)]


@pytest.mark.parametrize("name,symmetric,dtype,with_bias,group_size", OPCHECK_CASES, ids=str)
def test_opcheck(core, name, symmetric, dtype, with_bias, group_size):
    packed, scales, offsets = make_weight(name, symmetric, 24, 128, group_size)
    x = torch.randn(3, 5, 128).to(dtype)
    bias = torch.randn(24).to(dtype) if with_bias else None
    # the op has no autograd formula, so the autograd registration test does not apply
    torch.library.opcheck(OP.default, (x, packed, scales, offsets, bias, name, group_size),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_meta_tensors_give_the_output_shape():
    meta = lambda *s, dtype=torch.float16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    x = meta(2, 3, 320, dtype=torch.bfloat16)
    y = OP(x, meta(40, 320 * 3 // 32, dtype=torch.int32), meta(40, 10), meta(40, 10), meta(40), "int3", 32)
    assert y.device.type == "meta" and y.dtype == torch.bfloat16 and tuple(y.shape) == (2, 3, 40)
    y = OP(meta(5, 64, dtype=torch.float32), meta(7, 8, dtype=torch.int32), meta(7, 1), None, None, "int4", 64)
    assert y.device.type == "meta" and y.dtype == torch.float32 and tuple(y.shape) == (5, 7)
    y = OP(meta(576), meta(7, 72, dtype=torch.int32), meta(7, 5), None, None, "fp4", 128)
    assert tuple(y.shape) == (7,)


def test_torch_compile(core, spec):
    packed, scales, offsets = make_weight("int4", False, 24, 128, 32)
    f = torch.compile(lambda x: OP(x, packed, scales, offsets, None, "int4", 32) * 2, backend="eager",
                      fullgraph=True)
    x = torch.randn(3, 128)
    ref = 2 * spec_matmul(spec, "int4", x, packed, scales, offsets, None, 32)
    assert_close_to_spec(f(x), ref, torch.float32, 2 * vnni_slack(spec, "int4", x, packed, scales, offsets, 32))


# -- bad input ------------------------------------------------------------------------------------------
def bad_cases():
    k, n, g = 96, 8, 32
    p4, s, o = make_weight("int4", False, n, k, g)
    x = torch.randn(3, k)
    p3 = make_weight("int3", True, n, k, g)[0]
    p8 = make_weight("fp8", True, n, k, g)[0]
    meta = lambda t: t.to("meta")  # noqa: E731
    return [
        # (args, exception, pattern)
        ((x, p4, s, o, None, "int5", g), ValueError, r"unknown format 'int5'"),
        # K must be a multiple of 32 (docs: the packing block), even where the packed width fits
        ((torch.randn(3, 40), p4[:, :5].contiguous(), s[:, :1], None, None, "int4", 64), ValueError, r"K=40"),
        ((x, p4, s, None, None, "int4", g), None, None),  # control: valid
        ((torch.randn(3, 64), p4, s, o, None, "int4", g), ValueError, r"K=64"),
        ((x, p3, s, o, None, "int4", g), ValueError, r"K=96.*72 int4 codes"),
        ((x, p8, s, None, None, "int4", g), ValueError, r"K=96"),
        ((x, p4, s[:, :2], o[:, :2], None, "int4", 48), ValueError, r"group_size=48"),
        ((x, p4, s, o, None, "int4", 0), ValueError, r"group_size=0"),
        ((x, p4, s, o, None, "int4", -1), ValueError, r"group_size=-1"),
        ((x, p4, s.float(), o, None, "int4", g), ValueError, r"scales must be float16.*float32"),
        ((x, p4, s[:, :2], o, None, "int4", g), ValueError, r"scales .*\(8, 3\).*\(8, 2\)"),
        ((x, p4, s, o, None, "int4", 64), ValueError, r"scales .*\(8, 2\).*\(8, 3\)"),  # ceil(96/64) = 2
        ((x, p4, s, o.float(), None, "int4", g), ValueError, r"offsets must be float16"),
        ((x, p4, s, o[:5], None, "int4", g), ValueError, r"offsets .*\(5, 3\)"),
        ((x, p4, s, o, None, "fp4", g), ValueError, r"fp4 takes no offsets"),
        ((x, p8, s, o, None, "fp8", g), ValueError, r"fp8 takes no offsets"),
        ((x, p4, s, o, torch.randn(n + 1), "int4", g), ValueError, r"bias .*\(9,\)"),
        ((x.long(), p4, s, o, None, "int4", g), TypeError, r"activations .*int64"),
        ((x.double(), p4, s, o, None, "int4", g), TypeError, r"activations .*float64"),
        ((x, p4.long(), s, o, None, "int4", g), TypeError, r"packed .*int32.*int64"),
        ((x, p4[0], s, o, None, "int4", g), TypeError, r"packed .*2-D"),
        ((x, meta(p4), s, o, None, "int4", g), ValueError, r"packed is on meta but x is on cpu"),
        ((x, p4, meta(s), o, None, "int4", g), ValueError, r"scales is on meta"),
        ((meta(x), meta(p4), meta(s), o, None, "int4", g), ValueError, r"offsets is on cpu but x is on meta"),
        ((meta(x), meta(p4), meta(s), None, torch.randn(n), "int4", g), ValueError, r"bias is on cpu"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_raises_clear_error(case):
    args, exc, pattern = bad_cases()[case]
    if exc is None:
        assert hasattr(_core, "quant_matmul"), "C++ kernel _core.quant_matmul is not built"
        OP(*args)
        return
    with pytest.raises(exc, match=pattern):
        OP(*args)
    if all(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor)):
        with pytest.raises(exc, match=pattern):
            reference_quant_matmul(*args)


def raw_bad_cases():
    k, n, g, m = 96, 8, 32, 3
    p, s, o = make_weight("int4", False, n, k, g)
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    return [
        ((x, p, s, o, None, out, "int5", g, 1), ValueError, r"unknown format 'int5'"),
        ((x, p, s, o, None, torch.empty(m, n, dtype=torch.float16), "int4", g, 1), TypeError, r"out"),
        ((x, p, s, o, None, torch.empty(m, n + 1), "int4", g, 1), ValueError, r"out .*\(3, 9\)"),
        ((x, p, s, o, torch.randn(n).half(), out, "int4", g, 1), TypeError, r"bias"),
        ((x, p, s, o, torch.randn(n + 1), out, "int4", g, 1), ValueError, r"bias"),
        ((x, p, s, o, None, out, "int4", g, 0), ValueError, r"n_threads"),
        ((x, p, s, o, None, out, "int4", 48, 1), ValueError, r"group_size=48"),
        ((x, p, s.float(), o, None, out, "int4", g, 1), TypeError, r"scales"),
        ((x, p, s[:, :2].contiguous(), o, None, out, "int4", g, 1), ValueError, r"scales"),
        ((x, p, s, o[:2], None, out, "int4", g, 1), ValueError, r"offsets"),
        ((x, p, s, o, None, out, "fp4", g, 1), ValueError, r"offsets"),
        ((x.double(), p, s, o, None, out, "int4", g, 1), TypeError, r"x "),
        ((x[:, :64].contiguous(), p, s, o, None, out, "int4", g, 1), ValueError, r"K=64"),
        ((x, p[:, :-1].contiguous(), s, o, None, out, "int4", g, 1), ValueError, r"packed"),
        # non-contiguous tensors are not accepted by the raw kernel (the op makes them contiguous)
        ((x.T.contiguous().T, p, s, o, None, out, "int4", g, 1), TypeError, r"incompatible function arguments"),
        ((x, p, s, o, None, torch.empty(n, m).T, "int4", g, 1), TypeError, r"incompatible function arguments"),
    ]


@pytest.mark.parametrize("case", range(len(raw_bad_cases())))
def test_raw_kernel_rejects_bad_input(core, case):
    """The kernel entry point checks its arguments itself instead of reading out of bounds."""
    args, exc, pattern = raw_bad_cases()[case]
    with pytest.raises(exc, match=pattern):
        core.quant_matmul(*args)
