"""quantize_weight against docs/formats.md "Quantization": every stored tensor is decoded with the
independent spec oracle (tests/conftest.py), never with the package's dequantize."""

import re

import numpy as np
import pytest
import torch

import metal_marlin as mm

INT_CASES = [("int2", False), ("int3", False), ("int4", False), ("int8", False),
             ("int2", True), ("int3", True), ("int4", True), ("int8", True)]
ALL_CASES = [*INT_CASES, ("fp4", True), ("fp8", True)]


def stored(qw):
    """(packed, scales, offsets) as the oracle takes them."""
    return qw.packed, qw.scales, qw.offsets


def spec_deq(spec, name, qw):
    return spec.dequant(name, *stored(qw), qw.shape[-1], qw.group_size)


def element_grid(spec, name, qw):
    """Every code's value for each weight's group: [..., K, C] float64 (fp8 NaN codes excluded)."""
    bits, k = spec.bits[name], qw.shape[-1]
    u = np.arange(2**bits)
    if name == "fp8":
        u = u[(u & 0x7F) != 0x7F]
    group = np.arange(k) // qw.group_size
    s = qw.scales.numpy().astype(np.float64)[..., group, None]
    g = s * spec.values(name, u, qw.offsets is None)
    if qw.offsets is not None:
        g = g + qw.offsets.numpy().astype(np.float64)[..., group, None]
    return g


def grouped(a, group_size):
    return a.reshape(*a.shape[:-1], a.shape[-1] // group_size, group_size)


# -- codes are the nearest grid point for the stored scale / offset --------------------------------
@pytest.mark.parametrize("k,group_size", [(128, 32), (160, 64)], ids=["g32", "g64-shorter-last"])
@pytest.mark.parametrize("scale_method", ["mse", "absmax"])
@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_codes_are_nearest_grid_point(name, symmetric, scale_method, k, group_size, spec):
    w = torch.randn(6, k) * torch.tensor([0.01, 1.0, 30.0, 1.0, 0.2, 5.0])[:, None]
    w[1, :64] += 3.0  # off-centre groups (the asymmetric offset matters)
    qw = mm.quantize_weight(w, name, group_size=group_size, symmetric=symmetric, scale_method=scale_method)
    assert qw.group_size == group_size and qw.symmetric == symmetric
    wd = w.double().numpy()[..., None]  # [N, K, 1]
    deq = spec_deq(spec, name, qw)[..., None]
    grid = element_grid(spec, name, qw)  # [N, K, C]
    dist = np.abs(wd - grid)
    # float32 arithmetic in the quantizer may pick the other neighbour of an exact float64 tie only
    # within a few float32 ulps of the operands
    group = np.arange(k) // group_size
    s = np.abs(qw.scales.numpy().astype(np.float64))[..., group, None]
    o = 0.0 if symmetric else np.abs(qw.offsets.numpy().astype(np.float64))[..., group, None]
    tol = 1e-6 * (np.abs(wd) + o + s * 2 ** spec.bits[name])
    excess = np.abs(wd - deq) - dist.min(axis=-1, keepdims=True)
    assert (excess <= tol).all(), f"max excess {excess.max()} over the nearest grid point"
    if name.startswith("int"):
        # within the grid's range, the error is at most half a step
        inside = (wd >= grid.min(axis=-1, keepdims=True)) & (wd <= grid.max(axis=-1, keepdims=True))
        assert inside.mean() > 0.5  # not vacuous (int2 "mse" clips a lot)
        assert (np.abs(wd - deq)[inside] <= (s / 2 + tol)[inside]).all()
    if name == "fp8":
        u = spec.codes(qw.packed, 8, k)
        assert not ((u & 0x7F) == 0x7F).any(), "NaN code stored"


def test_fp8_never_stores_nan_when_the_rounded_scale_clips(spec):
    # 449/448 rounds down in float16, so 449/s > 448: the top value must saturate to 448 (0x7E), not NaN
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 449.0, -449.0
    qw = mm.quantize_weight(w, "fp8", group_size=32, scale_method="absmax")
    s = float(qw.scales[0, 0])
    assert 449.0 / s > 448.0
    u = spec.codes(qw.packed, 8, 32)[0]
    assert u[0] == 0x7E and u[1] == 0xFE


def test_fp4_ties_go_to_the_even_code(spec):
    # max 6 -> s = 6/6 = 1 exactly; every other value is the exact midpoint of two E2M1 neighbours
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0, 2, 2, 4, 4, 6, 6]  # the neighbour with mantissa bit 0
    row = [6.0, *ties, *(-t for t in ties)]
    row += [0.0] * (32 - len(row))
    qw = mm.quantize_weight(torch.tensor([row]), "fp4", group_size=32, scale_method="absmax")
    assert float(qw.scales[0, 0]) == 1.0
    u = spec.codes(qw.packed, 4, 32)[0]
    assert u[0] == 7
    assert list(u[1:8]) == expected
    assert list(u[8:15]) == [8 + e for e in expected]


def test_fp8_ties_go_to_the_even_code(spec):
    # max 448 -> s = 1; midpoints in the normal and the subnormal range
    row = [448.0, 1 + 1 / 16, 1 + 3 / 16, 2.0**-10, 3 * 2.0**-10, -(1 + 1 / 16)] + [0.0] * 26
    qw = mm.quantize_weight(torch.tensor([row]), "fp8", group_size=32, scale_method="absmax")
    assert float(qw.scales[0, 0]) == 1.0
    u = spec.codes(qw.packed, 8, 32)[0]
    assert list(u[:6]) == [0x7E, 0x38, 0x3A, 0x00, 0x02, 0xB8]


@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_ties_go_to_even(symmetric, spec):
    if symmetric:  # max 7 -> s = 1, codes u = round(w) + 8
        row, expected = [7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5], [15, 8, 10, 10, 8, 6, 6]
    else:  # min 0, max 15 -> s = 1, o = 0, codes u = round(w)
        row, expected = [0.0, 15.0, 0.5, 1.5, 2.5, 13.5], [0, 15, 0, 2, 2, 14]
    row = row + [row[-1]] * (32 - len(row))
    qw = mm.quantize_weight(torch.tensor([row]), "int4", group_size=32, symmetric=symmetric,
                            scale_method="absmax")
    assert float(qw.scales[0, 0]) == 1.0
    u = spec.codes(qw.packed, 4, 32)[0]
    assert list(u[: len(expected)]) == expected


# -- scale choice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_absmax_scales_follow_the_spec(name, symmetric, spec):
    w = torch.randn(4, 256) * 3
    qw = mm.quantize_weight(w, name, group_size=64, symmetric=symmetric, scale_method="absmax")
    wg = grouped(w.double().numpy(), 64)
    bits = spec.bits[name]
    if not symmetric:
        s = (wg.max(-1) - wg.min(-1)) / (2**bits - 1)
        np.testing.assert_array_equal(qw.offsets.numpy(), wg.min(-1).astype(np.float16))
    else:
        qmax = {"fp4": 6.0, "fp8": 448.0}.get(name, 2 ** (bits - 1) - 1)
        s = np.abs(wg).max(-1) / qmax
    # float32 quotient then float16: at most one float16 ulp from the float64 quotient rounded once
    np.testing.assert_allclose(qw.scales.numpy().astype(np.float64), s, rtol=2.0**-10, atol=0)
    if name.startswith("int") and symmetric:  # code 0 (= -2^(bits-1)) only by clamping
        assert spec.codes(qw.packed, bits, 256).min() >= 1


@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_mse_never_worse_than_absmax(name, symmetric, spec):
    w = torch.randn(16, 512)
    w[:2] = torch.rand(2, 512) ** 4  # skewed groups as well
    errs = {}
    for method in ("mse", "absmax"):
        qw = mm.quantize_weight(w, name, group_size=128, symmetric=symmetric, scale_method=method)
        errs[method] = (grouped(spec_deq(spec, name, qw) - w.double().numpy(), 128) ** 2).sum(-1)
    # the search compares float32 sums: allow their rounding
    assert (errs["mse"] <= errs["absmax"] * (1 + 1e-5) + 1e-12).all()
    if spec.bits[name] in (3, 4):
        assert errs["mse"].mean() < 0.95 * errs["absmax"].mean()


def test_mse_is_the_default_scale_method(spec):
    w = torch.randn(8, 256)
    a, b = mm.quantize_weight(w, "int3"), mm.quantize_weight(w, "int3", scale_method="mse")
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)


# MSE of N(0,1) at group 128 (bands from the uniform-quantizer estimate step^2/12 with the expected
# range of 128 normal samples, about +-2.6; "mse" must do at least that well)
MSE_BANDS = [("int2", False, 0.15), ("int3", False, 0.04), ("int4", False, 0.012), ("int8", False, 1e-4),
             ("int3", True, 0.05), ("int4", True, 0.012), ("int8", True, 1e-4),
             ("fp4", True, 0.013), ("fp8", True, 1e-3)]


@pytest.mark.parametrize("name,symmetric,band", MSE_BANDS)
def test_mse_on_gaussian_is_in_band(name, symmetric, band, spec):
    w = torch.randn(64, 1024)
    qw = mm.quantize_weight(w, name, group_size=128, symmetric=symmetric)
    mse = ((spec_deq(spec, name, qw) - w.double().numpy()) ** 2).mean()
    assert mse < band


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_bits_per_weight_is_the_spec_formula(name, symmetric, group_size, spec):
    k = 384
    qw = mm.quantize_weight(torch.randn(8, k), name, group_size=group_size, symmetric=symmetric)
    g = k if group_size == -1 else group_size
    assert qw.group_size == g
    expected = spec.bits[name] + 16 / g + (0 if symmetric else 16 / g)
    assert qw.bits_per_weight == pytest.approx(expected, rel=1e-12)
    # stored tensors: the spec's table
    assert qw.packed.dtype == torch.int32 and tuple(qw.packed.shape) == (8, k * spec.bits[name] // 32)
    assert qw.scales.dtype == torch.float16 and tuple(qw.scales.shape) == (8, k // g)
    assert (qw.offsets is None) == symmetric
    if not symmetric:
        assert qw.offsets.dtype == torch.float16 and tuple(qw.offsets.shape) == (8, k // g)


@pytest.mark.parametrize("k,group_size", [(576, 128), (320, 256), (96, 64), (64, 128)], ids=str)
@pytest.mark.parametrize("name,symmetric", [("int4", False), ("int3", True), ("fp8", True), ("int2", False)])
def test_shorter_last_group(name, symmetric, k, group_size, spec):
    """docs: ceil(K/G) groups; a shorter last group is a group of its own (its own scale search)."""
    w = torch.randn(5, k)
    w[:, -16:] *= 40  # outliers in the tail: the last group must not share a scale with the others
    qw = mm.quantize_weight(w, name, group_size=group_size, symmetric=symmetric)
    groups = -(-k // group_size)
    full = (groups - 1) * group_size
    assert tuple(qw.scales.shape) == (5, groups)
    assert qw.group_size == min(group_size, k)
    tail = mm.quantize_weight(w[:, full:], name, group_size=-1, symmetric=symmetric)
    assert torch.equal(qw.scales[:, -1:], tail.scales)
    if not symmetric:
        assert torch.equal(qw.offsets[:, -1:], tail.offsets)
    u = spec.codes(qw.packed, spec.bits[name], k)
    np.testing.assert_array_equal(u[:, full:], spec.codes(tail.packed, spec.bits[name], k - full))
    if full:
        head = mm.quantize_weight(w[:, :full], name, group_size=group_size, symmetric=symmetric)
        assert torch.equal(qw.scales[:, :-1], head.scales)
        np.testing.assert_array_equal(u[:, :full], spec.codes(head.packed, spec.bits[name], full))
    if full and name != "fp8":
        # the outlier-free groups keep their own small scales: far better than one scale per row
        # (not for fp8, whose relative precision hardly depends on the scale)
        one = mm.quantize_weight(w, name, group_size=-1, symmetric=symmetric)
        err = ((spec_deq(spec, name, qw) - w.double().numpy())[:, :full] ** 2).mean()
        err_one = ((spec_deq(spec, name, one) - w.double().numpy())[:, :full] ** 2).mean()
        assert err < 0.2 * err_one
    # storage: ceil(K/G) scales (and offsets) per row
    expected_bpw = spec.bits[name] + (16 if symmetric else 32) * groups / k
    assert qw.bits_per_weight == pytest.approx(expected_bpw, rel=1e-12)
    assert qw.dequantize().shape == (5, k)


def test_bits_per_weight_documented_examples():
    w = torch.randn(4, 256)
    assert mm.quantize_weight(w, "int4", group_size=32, symmetric=False).bits_per_weight == 5.0
    assert mm.quantize_weight(w, "int4", group_size=128, symmetric=True).bits_per_weight == 4.125


def test_default_symmetry():
    w = torch.randn(4, 128)
    assert mm.quantize_weight(w, "int8").symmetric
    for name in ("int2", "int3", "int4"):
        assert not mm.quantize_weight(w, name).symmetric
    for name in ("fp4", "fp8"):
        assert mm.quantize_weight(w, name).symmetric


# -- lookups and errors --------------------------------------------------------------------------
@pytest.mark.parametrize("family,bits", [("int", 2), ("int", 3), ("int", 4), ("int", 8), ("fp", 4), ("fp", 8)])
def test_family_and_bits_lookup(family, bits):
    w = torch.randn(4, 128)
    a = mm.quantize_weight(w, family, bits=bits, group_size=32)
    b = mm.quantize_weight(w, f"{family}{bits}", group_size=32)
    assert a.format is b.format is mm.FORMATS[f"{family}{bits}"]
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
    assert (a.offsets is None and b.offsets is None) or torch.equal(a.offsets, b.offsets)
    assert mm.get_format(family, bits) is mm.FORMATS[f"{family}{bits}"]
    # bits= matching the named format is accepted
    assert mm.get_format(f"{family}{bits}", bits) is mm.FORMATS[f"{family}{bits}"]


NAME = "model.layers.3.mlp.down_proj"
W = torch.randn(4, 128)


def nan_weight():
    w = W.clone()
    w[1, 5] = float("nan")
    return w


ERRORS = [
    # (kwargs, exception, pattern the message must contain, whether the tensor name must appear)
    (dict(w=W, format="int5"), ValueError, r"unknown format 'int5'", False),
    (dict(w=W, format="int", bits=5), ValueError, r"int with bits=5", False),
    (dict(w=W, format="int4", bits=8), ValueError, r"bits=8", False),
    (dict(w=torch.randn(4, 80), group_size=32), ValueError, r"K=80", True),
    (dict(w=torch.randn(4, 80), group_size=-1), ValueError, r"K=80", True),
    (dict(w=W, group_size=48), ValueError, r"group_size=48", True),
    (dict(w=W, group_size=0), ValueError, r"group_size=0", True),
    (dict(w=torch.randint(-8, 8, (4, 128), dtype=torch.int32)), TypeError, r"floating-point.*int32", True),
    (dict(w=nan_weight()), ValueError, r"NaN", True),
    (dict(w=W.clone().fill_(float("inf"))), ValueError, r"Inf", True),
    (dict(w=torch.randn(128)), ValueError, r"2-D.*\(128,\)", True),
    (dict(w=torch.randn(2, 2, 2, 128)), ValueError, r"2-D.*\(2, 2, 2, 128\)", True),
    (dict(w=W, format="fp4", symmetric=False), ValueError, r"fp4.*asymmetric", True),
    (dict(w=W, format="fp8", symmetric=False), ValueError, r"fp8.*asymmetric", True),
    (dict(w=W, scale_method="minmax"), ValueError, r"scale_method 'minmax'", True),
    (dict(w=W * 1e6, format="int4", symmetric=True), ValueError, r"scale.*float16", True),
    (dict(w=W * 1e6 + 1e9, format="int4", symmetric=False), ValueError, r"float16", True),
]


@pytest.mark.parametrize("kwargs,exc,pattern,named", ERRORS, ids=lambda v: v if isinstance(v, str) else "")
def test_errors_name_the_offender(kwargs, exc, pattern, named):
    with pytest.raises(exc, match=pattern):
        mm.quantize_weight(**kwargs)
    with pytest.raises(exc) as info:
        mm.quantize_weight(**kwargs, name=NAME)
    if named:
        assert re.search(re.escape(NAME), str(info.value)), str(info.value)


# -- special groups, stacks --------------------------------------------------------------------------
@pytest.mark.parametrize("scale_method", ["mse", "absmax"])
@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_zero_groups_dequantize_to_exact_zeros(name, symmetric, scale_method, spec):
    w = torch.randn(3, 128)
    w[0, 32:64] = 0
    w[2] = 0
    qw = mm.quantize_weight(w, name, group_size=32, symmetric=symmetric, scale_method=scale_method)
    deq = spec_deq(spec, name, qw)
    assert (deq[0, 32:64] == 0).all() and (deq[2] == 0).all()
    assert float(qw.scales[0, 1]) == 1.0 and (qw.scales[2] == 1).all()  # "get scale 1"
    assert (qw.dequantize()[2] == 0).all()


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8"])
def test_constant_group_is_exact_with_offsets(name, spec):
    # range 0 -> scale 1, offset = the (float16-exact) constant: represented exactly
    w = torch.full((2, 64), 0.375)
    w[1] = -1.5
    qw = mm.quantize_weight(w, name, group_size=32, symmetric=False)
    np.testing.assert_array_equal(spec_deq(spec, name, qw), w.double().numpy())


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("name,symmetric", ALL_CASES)
def test_stack_quantizes_like_each_matrix(name, symmetric, group_size, spec):
    w = torch.randn(3, 5, 96) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    qw = mm.quantize_weight(w, name, group_size=group_size, symmetric=symmetric)
    assert qw.shape == (3, 5, 96)
    assert tuple(qw.packed.shape) == (3, 5, 96 * spec.bits[name] // 32)
    for e in range(3):
        one = mm.quantize_weight(w[e], name, group_size=group_size, symmetric=symmetric)
        assert torch.equal(qw.packed[e], one.packed)
        assert torch.equal(qw.scales[e], one.scales)
        if not symmetric:
            assert torch.equal(qw.offsets[e], one.offsets)
        assert torch.equal(qw[e].packed, one.packed)
    np.testing.assert_array_equal(qw.dequantize().double().numpy(),
                                  torch.stack([qw[e].dequantize() for e in range(3)]).double().numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weight_dtypes(dtype, spec):
    w = torch.randn(4, 128)
    a = mm.quantize_weight(w.to(dtype), "int4", group_size=32)
    b = mm.quantize_weight(w.to(dtype).float(), "int4", group_size=32)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)


def test_non_contiguous_weight():
    w = torch.randn(128, 64)
    a = mm.quantize_weight(w.T, "int4", group_size=32)
    b = mm.quantize_weight(w.T.contiguous(), "int4", group_size=32)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
    assert torch.equal(a.offsets, b.offsets)
