"""The stored layout and the dequantization of every format against docs/formats.md.

The oracle is the ``spec`` fixture (tests/conftest.py): bit fields read from the raw words with
numpy and the spec's formulas in float64, never the package's unpack or value tables.
"""

import numpy as np
import pytest
import torch

import metal_marlin as mm
from metal_marlin.formats import GROUP_FORMATS

ALL_FORMATS = ["int2", "int3", "int4", "int8", "fp4", "fp8"]
SHAPES = [(1, 32), (5, 96), (3, 320), (2, 4, 64), (3, 5, 128)]  # incl. [E, N, K] stacks


def random_codes(fmt: str, shape, bits: int) -> torch.Tensor:
    u = torch.randint(0, 2**bits, shape, dtype=torch.int64)
    if fmt == "fp8":  # 0x7F / 0xFF are NaN: never stored by the quantizer, excluded from value tests
        u = torch.where((u & 0x7F) == 0x7F, u - 1, u)
    return u


def spec_pack(codes: np.ndarray, bits: int) -> torch.Tensor:
    """Hand-pack codes [..., K] into int32 words exactly as docs/formats.md describes."""
    codes = np.asarray(codes, dtype=np.uint64)
    k = codes.shape[-1]
    words = np.zeros((*codes.shape[:-1], k * bits // 32), dtype=np.uint64)
    for i in range(k):
        u = codes[..., i]
        if bits == 3:
            b, c = divmod(i, 32)
            words[..., 3 * b + c // 16] |= (u & np.uint64(3)) << np.uint64(2 * (c % 16))
            words[..., 3 * b + 2] |= (u >> np.uint64(2)) << np.uint64(c)
        else:
            per = 32 // bits
            words[..., i // per] |= u << np.uint64(bits * (i % per))
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def test_registry_is_the_spec_table(spec):
    assert sorted(GROUP_FORMATS) == sorted(ALL_FORMATS), "a new format needs its spec and its tests here"
    for name, fmt in GROUP_FORMATS.items():
        assert fmt.bits == spec.bits[name]


# -- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_pack_unpack_round_trip(name, shape):
    fmt = mm.FORMATS[name]
    u = torch.randint(0, 2**fmt.bits, shape, dtype=torch.int64)
    packed = fmt.pack(u)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (*shape[:-1], shape[-1] * fmt.bits // 32)
    assert torch.equal(fmt.unpack(packed).long(), u)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_packed_layout_is_the_spec(name, shape, spec):
    fmt = mm.FORMATS[name]
    u = torch.randint(0, 2**fmt.bits, shape, dtype=torch.int64)
    u[..., -1] = 2**fmt.bits - 1  # the top code of the last word sets the int32 sign bit
    packed = fmt.pack(u)
    np.testing.assert_array_equal(spec.codes(packed, fmt.bits, shape[-1]), u.numpy())
    # and the reverse: words hand-packed from the spec are the package's words and unpack to the codes
    hand = spec_pack(u.numpy(), fmt.bits)
    assert torch.equal(packed, hand)
    assert torch.equal(fmt.unpack(hand).long(), u)


def word(x: int) -> int:
    """An unsigned 32-bit literal as the int32 torch stores."""
    return x - 2**32 if x >= 2**31 else x


KNOWN_WORDS = [
    # (format, codes of one row, expected words)
    ("int8", [1, 2, 3, 4] * 8, [0x04030201] * 8),
    ("int8", [0xFF, 0, 0, 0x80] + [0] * 28, [0x800000FF] + [0] * 7),
    ("int4", list(range(8)) * 4, [0x76543210] * 4),
    ("int4", [15] * 32, [0xFFFFFFFF] * 4),
    ("int2", [0, 1, 2, 3] * 8, [0xE4E4E4E4] * 2),
    ("int2", [3] + [0] * 30 + [2], [0x00000003, 0x80000000]),
    # int3, codes 0..7 repeated: lo = 0,1,2,3,0,1,2,3.. (0xE4 per 4 codes); hi set for codes 4..7
    ("int3", list(range(8)) * 4, [0xE4E4E4E4, 0xE4E4E4E4, 0xF0F0F0F0]),
    # int3, a single 7 at c = 17: lo = 3 at bits 2-3 of word 1, hi at bit 17 of word 2
    ("int3", [0] * 17 + [7] + [0] * 14, [0, 0xC, 1 << 17]),
    # int3, a 5 at c = 0 (lo 1, hi 1) and a 6 at c = 31 (lo 2 at bits 30-31 of word 1, hi at bit 31)
    ("int3", [5] + [0] * 30 + [6], [0x1, 0x80000000, 0x80000001]),
    # second block of 32 codes goes to words 3..5
    ("int3", [0] * 32 + [3] + [0] * 31, [0, 0, 0, 0x3, 0, 0]),
    ("fp4", [1, 9] + [0] * 30, [0x91, 0, 0, 0]),
]


@pytest.mark.parametrize("name,row,words", KNOWN_WORDS)
def test_known_words(name, row, words):
    fmt = mm.FORMATS[name]
    u = torch.tensor([row], dtype=torch.int64)
    expected = torch.tensor([[word(w) for w in words]], dtype=torch.int32)
    assert torch.equal(fmt.pack(u), expected)
    assert torch.equal(fmt.unpack(expected).long(), u)


# -- dequantization -------------------------------------------------------------------------------
DEQ_CASES = [(n, True) for n in ALL_FORMATS] + [(n, False) for n in ("int2", "int3", "int4", "int8")]


# (shape, group_size): 32/64/128, per-channel (group = K), stacks, and a shorter last group when the
# group size does not divide K (576 = 4*128 + 64; 320 = 256 + 64; 96 = 64 + 32; 64 < 128: one group)
@pytest.mark.parametrize("shape,group_size", [((6, 384), 32), ((6, 384), 64), ((5, 384), 128),
                                             ((4, 320), 320), ((3, 4, 256), 64), ((4, 576), 128),
                                             ((3, 320), 256), ((2, 3, 96), 64), ((3, 64), 128)], ids=str)
@pytest.mark.parametrize("name,symmetric", DEQ_CASES)
def test_dequantize_is_the_spec_formula(name, symmetric, shape, group_size, spec):
    """Tolerance: symmetric values ``s * v`` are exact in float32 (an 11-bit fp16 significand times an
    integer < 2^8 or an E2M1/E4M3 value with at most 4 significant bits, far from float32's range
    limits), so they must be bit-exact. Asymmetric ``s * u`` is exact too and ``+ o`` is one
    correctly-rounded float32 addition of a value that is exact in float64: error <= 2^-24 * |w|."""
    fmt = mm.FORMATS[name]
    k = shape[-1]
    u = random_codes(name, shape, fmt.bits)
    gshape = (*shape[:-1], -(-k // group_size))
    scales = (torch.randn(gshape) * 0.1).half()
    rows = scales.view(-1, gshape[-1])  # extremes of float16: largest normal, smallest subnormal
    rows[0::2, 0] = 65504.0
    rows[1::2, 0] = 2.0**-24
    offsets = None if symmetric else (torch.randn(gshape) * 0.5).half()
    qw = mm.GroupQuantizedWeight(fmt, tuple(shape), fmt.pack(u), scales, offsets, group_size)
    got = qw.dequantize()
    assert got.dtype == torch.float32 and tuple(got.shape) == tuple(shape)
    ref = spec.dequant(name, qw.packed, scales, offsets, k, group_size)
    assert np.isfinite(ref).all()
    got64 = got.double().numpy()
    if symmetric:
        np.testing.assert_array_equal(got64, ref)
    else:
        np.testing.assert_allclose(got64, ref, rtol=2.0**-24, atol=0)
    # the dtype argument
    assert torch.equal(qw.dequantize(torch.float16), got.half())


def test_fp8_nan_codes_are_nan_in_the_spec(spec):
    assert np.isnan(spec.e4m3([0x7F, 0xFF])).all()
    assert np.isfinite(spec.e4m3([c for c in range(256) if c & 0x7F != 0x7F])).all()


def test_e4m3_spec_table_equals_torch_float8_e4m3fn(spec):
    """A second, independent source for the spec formula: torch's own float8_e4m3fn decoding."""
    finite = [c for c in range(256) if c & 0x7F != 0x7F]
    assert len(finite) == 254
    torch_vals = torch.tensor(finite, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    np.testing.assert_array_equal(spec.e4m3(finite), torch_vals)
    assert torch.tensor([0x7F, 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn).float().isnan().all()
    assert spec.e4m3(0x7E) == 448.0 and spec.e4m3(0x01) == 2.0**-9


def test_format_value_tables_are_the_spec(spec):
    """The package's tables (used by quantize and dequantize) against the spec's bit-field formulas."""
    fp8 = mm.FORMATS["fp8"].code_values().numpy()
    finite = np.array([c for c in range(256) if c & 0x7F != 0x7F])
    np.testing.assert_array_equal(fp8[finite], spec.e4m3(finite))
    np.testing.assert_array_equal(mm.FORMATS["fp4"].code_values().numpy(), spec.e2m1(np.arange(16)))
    np.testing.assert_array_equal(spec.e2m1(np.arange(8)), [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert np.signbit(spec.e2m1(8))  # u = 8 is negative zero
    for name in ("int2", "int3", "int4", "int8"):
        bits = spec.bits[name]
        np.testing.assert_array_equal(mm.FORMATS[name].code_values().numpy(),
                                      np.arange(2**bits) - 2 ** (bits - 1))


def test_stack_indexing_is_one_matrix(spec):
    fmt = mm.FORMATS["int3"]
    u = random_codes("int3", (3, 4, 64), 3)
    scales = torch.rand(3, 4, 2).half()
    offsets = torch.randn(3, 4, 2).half()
    qw = mm.GroupQuantizedWeight(fmt, (3, 4, 64), fmt.pack(u), scales, offsets, 32)
    for e in range(3):
        np.testing.assert_allclose(qw[e].dequantize().double().numpy(),
                                   spec.dequant("int3", qw.packed[e], scales[e], offsets[e], 64, 32),
                                   rtol=2.0**-24, atol=0)
