"""Self-tests of the MSL simulator (tests/mslsim): the modelled library against numpy, and planted bugs it must catch.

The kernels are in tests/mslsim/testdata/. References are computed here with numpy, independently of the
simulator; half arithmetic is checked step by step against numpy float16.
"""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.mslsim import SCHEDULES, MslCompileError, MslRuntimeError, compile_metal

DATA = Path(__file__).resolve().parents[1] / "mslsim" / "testdata"


@pytest.fixture(scope="module")
def lib():
    return compile_metal(DATA / "selftest.metal")


@pytest.fixture(scope="module")
def bugs():
    return compile_metal(DATA / "bugs.metal")


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def test_kernel_names_include_macro_instantiations(lib):
    assert set(lib.kernel_names) == {
        "vectors",
        "half_ops",
        "conversions",
        "collectives",
        "matrices",
        "atomics",
        "row_sums",
        "transpose",
        "positions",
        "scale_half_by_3",
        "scale_float_by_5",
        "rewrites",
        "bit_functions",
        "math_functions",
    }


def test_compile_is_cached(lib):
    start = time.perf_counter()
    again = compile_metal(DATA / "selftest.metal")
    assert again is lib
    assert time.perf_counter() - start < 0.5


def test_vectors_swizzles_and_conversions(lib):
    rng = np.random.default_rng(1)
    n = 37
    a = rng.normal(scale=3.0, size=(n, 4)).astype(np.float32)
    u = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint32)
    out = np.zeros((n, 8, 4), np.float32)
    params = np.array((n, -7.5), dtype=[("n", "<u4"), ("scale", "<f4")])[()]
    lib.run("vectors", grid=2, threadgroup=32, buffers={0: a, 1: u, 2: out, 3: params})
    np.testing.assert_array_equal(out[:, 0], a[:, ::-1])
    np.testing.assert_array_equal(out[:, 1], np.concatenate([a[:, :2], a[:, 2:] * 2], axis=1))
    np.testing.assert_array_equal(out[:, 2], u.astype(np.float32))  # value conversion, rounded to float
    np.testing.assert_array_equal(bits(out[:, 3]), u)  # as_type keeps the bits
    np.testing.assert_array_equal(out[:, 4], a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(out[:, 5], np.trunc(a))
    np.testing.assert_array_equal(out[:, 6], np.where(a > 0, a, np.float32(-7.5)))
    np.testing.assert_array_equal(out[:, 7, [0, 2]], a[:, [0, 2]])
    np.testing.assert_allclose(out[:, 7, 1], (a.astype(np.float64) ** 2).sum(1), rtol=1e-6)
    np.testing.assert_allclose(out[:, 7, 3], np.hypot(a[:, 0], a[:, 1]), rtol=1e-6)


def test_half_arithmetic_rounds_every_operation(lib):
    rng = np.random.default_rng(2)
    n = 4096
    a, b, c = (rng.uniform(-4, 4, n).astype(np.float16) for _ in range(3))
    b[np.abs(b) < 0.01] = np.float16(0.5)
    out = np.zeros((n, 6), np.float16)
    lib.run("half_ops", grid=n // 64, threadgroup=64, buffers={0: a, 1: b, 2: c, 3: out})
    h = np.float16
    np.testing.assert_array_equal(bits(out[:, 0]), bits(a * b + c))  # numpy rounds a*b, then the sum
    np.testing.assert_array_equal(bits(out[:, 1]), bits((a + b) * c - a))
    np.testing.assert_array_equal(bits(out[:, 2]), bits(a / b))
    np.testing.assert_array_equal(bits(out[:, 3]), bits(np.sqrt(np.abs(a))))
    fused = (a.astype(np.float64) * b + c).astype(np.float16)  # one rounding
    np.testing.assert_array_equal(bits(out[:, 4]), bits(fused))
    np.testing.assert_array_equal(bits(out[:, 5]), bits(a * h(0.1) + b * h(3.0)))
    # The checks above can fail: computing in float and rounding once gives different halfs.
    assert (bits(out[:, 0]) != bits(fused)).sum() > 100


def test_conversions(lib):
    ties = np.array([1 + 2**-11, 1 + 3 * 2**-11, 2049, 2051, 65504, 65520, -65520, 1e-8, 2**-24 * 1.5], np.float32)
    rng = np.random.default_rng(3)
    f = np.concatenate([ties, rng.normal(scale=1000, size=64 - ties.size).astype(np.float32)])
    n = rng.integers(-70000, 70000, size=64).astype(np.int32)
    to_half = np.zeros(64, np.float16)
    from_half = np.zeros(64, np.float32)
    to_int = np.zeros(64, np.int32)
    int_to_half = np.zeros(64, np.float16)
    lib.run("conversions", 1, 64, {0: f, 1: n, 2: to_half, 3: from_half, 4: to_int, 5: int_to_half})
    with np.errstate(over="ignore"):  # 65520 and beyond round to infinity
        f16, n16 = f.astype(np.float16), n.astype(np.float16)
    np.testing.assert_array_equal(bits(to_half), bits(f16))  # round to nearest even
    np.testing.assert_array_equal(from_half, f16.astype(np.float32))
    np.testing.assert_array_equal(to_int, np.trunc(f).astype(np.int32))
    np.testing.assert_array_equal(bits(int_to_half), bits(n16))


def test_integer_bit_functions(lib):
    rng = np.random.default_rng(10)
    n = 256
    u = rng.integers(0, 2**32, n, dtype=np.uint32)
    u[:4] = [0, 1, 0x80000000, 0xFFFFFFFF]
    v = rng.integers(0, 2**32, n, dtype=np.uint32)
    out = np.zeros((n, 16), np.uint32)
    lib.run("bit_functions", n // 64, 64, {0: u, 1: v, 2: out})
    mask = 0xFFFFFFFF
    for i in range(n):
        x, y = int(u[i]), int(v[i])
        s, t = x - (1 << 32) * (x >> 31), y - (1 << 32) * (y >> 31)
        offset, bits = y % 16, y % 17
        field = (x >> offset) & ((1 << bits) - 1)
        signed_field = field - (1 << bits) if bits and field >> (bits - 1) else field
        insert_mask = ((1 << bits) - 1) << offset
        r = y % 32
        expected = [
            bin(x).count("1"),
            32 - x.bit_length(),
            (x & -x).bit_length() - 1 if x else 32,
            int(f"{x:032b}"[::-1], 2),
            ((x << r) | (x >> (32 - r))) & mask if r else x,
            (x * y) >> 32,
            field,
            signed_field & mask,
            (x & ~insert_mask | (y << offset) & insert_mask) & mask,
            abs(s - t),
            ((s * t) >> 32) & mask,
            16 - (x & 0xFFFF).bit_length(),
            bin(x & 0xFF).count("1"),
            ((x & 0xFFFF) & -(x & 0xFFFF)).bit_length() - 1 if x & 0xFFFF else 16,
            abs(x - y),
            min(max(s, -1000), 1000) + 1000,
        ]
        assert out[i].tolist() == expected, i


def test_math_functions(lib):
    x = np.linspace(-3, 3, 64, dtype=np.float32)
    out = np.zeros((64, 12), np.float32)
    lib.run("math_functions", 1, 64, {0: x, 1: out})
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out[:, 0], np.exp(x64), rtol=1e-6)
    np.testing.assert_allclose(out[:, 1], np.exp2(x64), rtol=1e-6)
    np.testing.assert_allclose(out[:, 2], np.log(np.abs(x64) + 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[:, 3], 1 / np.sqrt(np.abs(x64) + 1), rtol=1e-6)
    np.testing.assert_allclose(out[:, 4], np.sqrt(np.abs(x64)), rtol=1e-6)
    np.testing.assert_allclose(out[:, 5], np.tanh(x64), rtol=1e-6, atol=1e-7)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(out[:, 6], np.exp(h.astype(np.float32)).astype(np.float16))  # rounded once
    np.testing.assert_array_equal(out[:, 7], np.maximum(h, 0))
    np.testing.assert_array_equal(out[:, 8], np.clip(-x, -0.5, 0.25))
    np.testing.assert_allclose(out[:, 9], x64 - np.floor(x64), atol=1e-7)
    np.testing.assert_array_equal(out[:, 10], 65505)
    np.testing.assert_array_equal(out[:, 11], 1)


def tree_sum(values: np.ndarray, present: np.ndarray) -> np.float32:
    """The simulator's documented reduction order: pairwise over lane order, absent lanes skipped."""
    v = list(values.astype(np.float32))
    p = list(present)
    step = 1
    while step < 32:
        for i in range(0, 32, 2 * step):
            if p[i] and p[i + step]:
                v[i] = np.float32(v[i] + v[i + step])
            elif p[i + step]:
                v[i] = v[i + step]
            p[i] = p[i] or p[i + step]
        step *= 2
    return v[0]


def test_collectives_with_a_partial_simdgroup(lib):
    rng = np.random.default_rng(4)
    x = rng.normal(size=48).astype(np.float32)
    source = ((np.arange(48) * 7 + 3) % 32).astype(np.uint16)
    out = np.zeros((48, 12), np.float32)
    ballots = np.zeros(48, np.uint64)
    lib.run("collectives", 1, 48, {0: x, 1: source, 2: out, 3: ballots})
    poison = np.uint32(0xFFFFFFFF)
    for first, size in ((0, 32), (32, 16)):
        lanes = np.arange(32)
        present = lanes < size
        v = np.zeros(32, np.float32)
        v[:size] = x[first : first + size]
        o = out[first : first + size]
        # lanes 0-2 returned before the last two collectives, which overwrote columns 0 and 1
        late = present & (lanes >= 3)
        np.testing.assert_array_equal(o[3:, 0], np.full(size - 3, v[3]))  # simd_broadcast_first
        np.testing.assert_array_equal(o[3:, 1], np.full(size - 3, tree_sum(v, late)))
        np.testing.assert_array_equal(o[:3, 0], np.full(3, tree_sum(v, present)))
        np.testing.assert_array_equal(o[:, 2], np.full(size, v[:size].min()))
        np.testing.assert_array_equal(o[:3, 1], np.full(3, v[:size].max()))
        np.testing.assert_array_equal(o[:, 3], np.cumsum(v[:size], dtype=np.float32))
        np.testing.assert_array_equal(o[:, 4], np.concatenate([[0], np.cumsum(v[: size - 1], dtype=np.float32)]))
        src = source[first : first + size].astype(int)
        expect = np.where(src < size, v[np.minimum(src, 31)], np.nan).astype(np.float32)
        np.testing.assert_array_equal(bits(o[:, 5])[src >= size], poison)
        np.testing.assert_array_equal(o[:, 5][src < size], expect[src < size])
        xor = lanes[:size] ^ 5
        np.testing.assert_array_equal(o[:, 6][xor < size], v[xor[xor < size]])
        np.testing.assert_array_equal(bits(o[:, 6])[xor >= size], poison)
        up = lanes[:size] - 3
        np.testing.assert_array_equal(o[:, 7], np.where(up >= 0, v[np.maximum(up, 0)], v[:size]))
        down = lanes[:size] + 3
        keeps_own = down >= 32  # beyond the simdgroup: unchanged
        reads_inactive = (down < 32) & (down >= size)  # a lane that does not exist: poison
        valid = ~keeps_own & ~reads_inactive
        np.testing.assert_array_equal(o[:, 8][valid], v[down[valid]])
        np.testing.assert_array_equal(o[:, 8][keeps_own], v[:size][keeps_own])
        np.testing.assert_array_equal(bits(o[:, 8])[reads_inactive], poison)
        np.testing.assert_array_equal(o[:, 9], np.full(size, v[2]))
        np.testing.assert_array_equal(o[:, 10], np.full(size, float((v[:size] > 2).any())))
        np.testing.assert_array_equal(o[:, 11], np.full(size, float((v[:size] > -2).all())))
        mask = sum(1 << i for i in range(size) if v[i] > 0)
        np.testing.assert_array_equal(ballots[first : first + size], np.full(size, mask, np.uint64))


def lane_coordinates(lane: int) -> tuple[int, int]:
    """Apple's simdgroup_matrix layout as MLX's steel BaseMMAFrag documents it."""
    quad = lane // 4
    return (quad & 4) + (lane // 2) % 4, (quad & 2) * 2 + (lane % 2) * 2


def test_simdgroup_matrix(lib):
    rng = np.random.default_rng(5)
    A, Bt, C = (rng.normal(size=(8, 8)).astype(np.float32) for _ in range(3))
    wide = rng.normal(size=(10, 12)).astype(np.float32)
    Ah, Bh = (rng.normal(size=(8, 8)).astype(np.float16) for _ in range(2))
    D = np.zeros((8, 8), np.float32)
    elements = np.zeros((32, 2), np.float32)
    extra = np.zeros((4, 8, 8), np.float32)
    lib.run("matrices", 1, 32, {0: A, 1: Bt, 2: C, 3: wide, 4: Ah, 5: Bh, 6: D, 7: elements, 8: extra})
    ref = A.astype(np.float64) @ Bt.T.astype(np.float64) + C
    np.testing.assert_allclose(D, ref, rtol=1e-6, atol=1e-6)
    for lane in range(32):
        row, col = lane_coordinates(lane)
        np.testing.assert_array_equal(elements[lane], A[row, col : col + 2])
    np.testing.assert_array_equal(extra[0], wide[1:9, 3:11])  # elements_per_row 12, origin (x=3, y=1)
    np.testing.assert_array_equal(extra[1], 2 * np.eye(8, dtype=np.float32))
    np.testing.assert_array_equal(extra[2], np.full((8, 8), 3, np.float32))
    product = Ah.astype(np.float64) @ Bh.astype(np.float64)
    np.testing.assert_allclose(extra[3], product.T, rtol=1e-6, atol=1e-6)  # stored transposed


def test_atomics(lib):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 1000, size=256).astype(np.uint32)
    counter = np.zeros(1, np.uint32)
    maximum = np.zeros(1, np.uint32)
    total = np.zeros(1, np.float32)
    histograms = np.zeros((4, 8), np.uint32)
    exchanged = np.zeros(1, np.int32)
    lib.run("atomics", 4, 64, {0: x, 1: counter, 2: maximum, 3: total, 4: histograms, 5: exchanged})
    assert counter[0] == 256
    assert maximum[0] == x.max()
    assert total[0] == (x % 4).sum()  # integers: exact in any order
    expected = np.stack([np.bincount(x[g * 64 : (g + 1) * 64] % 8, minlength=8) for g in range(4)])
    np.testing.assert_array_equal(histograms, expected)
    assert exchanged[0] == (x % 3).sum()


def test_tiled_row_sums(lib):
    rng = np.random.default_rng(7)
    rows, length = 5, 300  # not a multiple of the 64 threads
    x = rng.normal(size=(rows, length)).astype(np.float32)
    out = torch.zeros(rows)
    lib.run("row_sums", rows, 64, {0: x, 1: out, 2: np.uint32(length)})
    np.testing.assert_allclose(out.numpy(), x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-5)


def test_transpose_through_dynamic_threadgroup_memory(lib):
    x = torch.randn(37, 21).half()
    y = torch.zeros(21, 37, dtype=torch.float16)
    shape = np.array([37, 21], np.uint32).tobytes()
    lib.run("transpose", (2, 3), (16, 16), {0: x, 1: y, 2: shape}, threadgroup_memory={0: 16 * 17 * 2})
    assert torch.equal(y, x.T)


def test_thread_positions(lib):
    grid, tg = (2, 3, 2), (5, 4, 3)
    size = [g * t for g, t in zip(grid, tg, strict=True)]
    out = np.zeros((size[2], size[1], size[0], 20), np.uint32)
    lib.run("positions", grid, tg, {0: out})
    z, y, x = np.meshgrid(*(np.arange(s) for s in reversed(size)), indexing="ij")
    local = [x % tg[0], y % tg[1], z % tg[2]]
    index = (local[2] * tg[1] + local[1]) * tg[0] + local[0]
    expected = [x, y, z, *local, x // tg[0], y // tg[1], z // tg[2], *(np.full_like(x, v) for v in tg)]
    expected += [np.full_like(x, v) for v in grid]
    expected += [index, index % 32, index // 32, np.full_like(x, 2), np.full_like(x, 32)]
    np.testing.assert_array_equal(out, np.stack(expected, axis=-1))


def test_template_instantiations(lib):
    x = torch.randn(64).half()
    y = torch.zeros(64, dtype=torch.float16)
    lib.run("scale_half_by_3", 2, 32, {0: y, 1: x})
    assert torch.equal(y, x * 3)
    xf = np.arange(32, dtype=np.float32)
    yf = np.zeros(32, np.float32)
    lib.run("scale_float_by_5", 1, 32, {0: yf, 1: xf}, schedule="random")
    np.testing.assert_array_equal(yf, xf * 5)


def test_rewritten_source_forms(lib):
    x = np.arange(64).astype(np.float16)
    y = np.zeros(64, np.float32)
    lib.run("rewrites", 1, 64, {0: y, 1: x})
    # tile: (1 + 1.5) + 2 + 1 (the string starts with '('); wide: x; a, b: 0.1, 0.5 as float literals
    np.testing.assert_array_equal(y, np.float32(5.5) + x.astype(np.float32) + np.float32(0.1) + np.float32(0.5))


def test_correct_variants_pass_every_schedule(bugs):
    x = np.random.default_rng(8).normal(size=256).astype(np.float32)
    out = np.zeros(2, np.float32)
    bugs.run("tree_sum", 2, 128, {0: x, 1: out})
    np.testing.assert_allclose(out, x.reshape(2, 128).astype(np.float64).sum(1), rtol=1e-5)
    sums = np.zeros(64, np.float32)
    tiles = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
    bugs.run("tile_sums", 1, 64, {0: tiles, 1: sums, 2: np.uint32(3)})
    np.testing.assert_array_equal(sums[:32], tiles[:, 32:].sum())
    np.testing.assert_array_equal(sums[32:], tiles[:, :32].sum())


def test_missing_barrier_is_a_race(bugs):
    x = np.random.default_rng(9).normal(size=256).astype(np.float32)
    with pytest.raises(MslRuntimeError, match="differs between schedules"):
        bugs.run("tree_sum_no_barrier", 2, 128, {0: x, 1: np.zeros(2, np.float32)})


def test_missing_write_after_read_barrier_needs_the_runahead_schedule(bugs):
    tiles = np.arange(3 * 64, dtype=np.float32)
    with pytest.raises(MslRuntimeError, match="'runahead'"):
        bugs.run("tile_sums_no_war_barrier", 1, 64, {0: tiles, 1: np.zeros(64, np.float32), 2: np.uint32(3)})
    for schedule in SCHEDULES[:3]:  # lanes in step: every read happens before the next write
        sums = np.zeros(64, np.float32)
        bugs.run("tile_sums_no_war_barrier", 1, 64, {0: tiles, 1: sums, 2: np.uint32(3)}, schedule=schedule)
        assert sums[0] == tiles.reshape(3, 64)[:, 32:].sum()


def test_threadgroups_racing_on_one_element(bugs):
    with pytest.raises(MslRuntimeError, match="buffer\\(0\\) differs between schedules 'forward' and 'reverse'"):
        bugs.run("same_element", 2, 32, {0: np.zeros(1, np.uint32)})


def test_out_of_bounds_write_faults(bugs):
    y = np.zeros(64, np.float32)
    fault = r"write_past_end.*out-of-bounds access to buffer\(0\) at byte offset 256"
    with pytest.raises(MslRuntimeError, match=fault):
        bugs.run("write_past_end", 1, 64, {0: y})
    ragged = np.zeros(61, np.float32)  # any size: the end of every buffer touches the guard page
    with pytest.raises(MslRuntimeError, match=r"out-of-bounds access to buffer\(0\) at byte offset 244"):
        bugs.run("write_past_end", 1, 61, {0: ragged})
    with pytest.raises(MslRuntimeError, match=r"out-of-bounds write to buffer\(0\) at byte offset -4"):
        bugs.run("write_before_start", 1, 64, {0: y})


def test_divergent_barrier(bugs):
    with pytest.raises(MslRuntimeError, match="divergent_barrier.*threadgroup_barrier not reached by every thread"):
        bugs.run("divergent_barrier", 1, 32, {0: np.zeros(32, np.float32)})


def test_return_before_barrier(bugs):
    with pytest.raises(MslRuntimeError, match="threads 0-39 wait at threadgroup_barrier.*threads 40-63 returned"):
        bugs.run("return_before_barrier", 1, 64, {0: np.zeros(64, np.float32), 1: np.uint32(40)})
    y = np.zeros(64, np.float32)
    bugs.run("return_before_barrier", 1, 64, {0: y, 1: np.uint32(64)})
    np.testing.assert_array_equal(y, np.arange(63, -1, -1))


def test_threadgroup_memory_limit(bugs):
    with pytest.raises(MslRuntimeError, match="exceeds the 32 KiB limit"):
        bugs.run("too_much_threadgroup_memory", 1, 64, {0: np.zeros(64, np.float32)})
    y = np.zeros(64, np.float32)
    bugs.run("static_plus_dynamic", 1, 64, {0: y}, threadgroup_memory={0: 16384})
    np.testing.assert_array_equal(y, 3)
    with pytest.raises(MslRuntimeError, match="exceeds the 32 KiB limit"):
        bugs.run("static_plus_dynamic", 1, 64, {0: y}, threadgroup_memory={0: 16400})


def test_divergent_collective(bugs):
    with pytest.raises(MslRuntimeError, match="divergent simdgroup collective.*simd_sum.*simd_max"):
        bugs.run("divergent_collective", 1, 32, {0: np.zeros(32, np.float32)})


def test_non_uniform_shuffle_mask(bugs):
    with pytest.raises(MslRuntimeError, match=r"argument of a simd shuffle differs between lanes at .*bugs.metal:\d+"):
        bugs.run("nonuniform_shuffle", 1, 32, {0: np.zeros(32, np.float32)})


def test_endless_loop_times_out(bugs):
    with pytest.raises(MslRuntimeError, match="no result after 0.5 s"):
        bugs.run("spin_forever", 1, 1, {0: np.zeros(1, np.uint32)}, timeout=0.5)


def test_stack_overflow_and_division_by_zero_are_reported(bugs):
    with pytest.raises(MslRuntimeError, match="huge_locals.*stack overflow"):
        bugs.run("huge_locals", 1, 32, {0: np.zeros(32, np.float32)}, schedule="forward")
    with pytest.raises(MslRuntimeError, match=r"integer division by zero.*thread \(3,0,0\)"):
        bugs.run("divide_by_zero", 1, 32, {0: np.zeros(32, np.int32)}, schedule="forward")


def test_uninitialised_threadgroup_memory_is_poison(bugs):
    y = np.zeros(64, np.float32)
    bugs.run("read_uninitialised", 1, 64, {0: y})
    np.testing.assert_array_equal(y[1::2], 1.0)
    np.testing.assert_array_equal(bits(y[0::2]), np.uint32(0xFFFFFFFF))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("address_space_mismatch.metal", r"(?s)address_space_mismatch.metal:8:.*address space '1'.*address space '3'"),
        ("constant_write.metal", r"constant_write.metal:5:37: error: read-only variable is not assignable"),
        ("vector_cast.metal", r"vector_cast.metal:7:10: error: C-style cast to the vector type 'float4'"),
    ],
)
def test_refused_at_compile_time(name, message):
    with pytest.raises(MslCompileError, match=message):
        compile_metal(DATA / name)


def test_bad_launches_are_reported(lib):
    with pytest.raises(MslRuntimeError, match="buffer\\(1\\) is not bound"):
        lib.run("scale_half_by_3", 1, 32, {0: np.zeros(32, np.float16)})
    with pytest.raises(MslRuntimeError, match="buffer\\(3\\) has 4 bytes but the kernel reads a 8-byte value"):
        lib.run("vectors", 1, 32, {0: np.zeros(4, np.float32), 1: np.zeros(4, np.uint32), 2: np.zeros(32, np.float32),
                                    3: np.uint32(1)})
    with pytest.raises(MslRuntimeError, match="no kernel 'nope'"):
        lib.run("nope", 1, 32, {})
