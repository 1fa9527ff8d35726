"""``metal_marlin::moe_experts`` (CPU kernel, op, reference op) against an independent float64 oracle:
each expert's weights decoded by the docs/formats.md oracle (the ``spec`` fixture), SwiGLU routing
computed token by token and slot by slot in numpy."""

import numpy as np
import pytest
import test_quant_matmul as qm
import torch
from test_quant_matmul import core, simd_level  # noqa: F401  fixtures: the kernel path in effect

from metal_marlin import _core
from metal_marlin.nn import DenseExperts, QuantizedExperts
from metal_marlin.ops import moe_experts
from metal_marlin.ops.experts import reference_moe_experts

OP = torch.ops.metal_marlin.moe_experts

FORMAT_CASES = [("int4", False), ("int4", True), ("int8", True), ("fp4", True), ("int3", False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
H, INTER, G = 96, 64, 32  # hidden, intermediate (per expert), group size: 96 = 3 groups, 64 = 2
UNUSED_EXPERT = 1  # routed to by no token in the random routings below


def make_experts(name, symmetric, num_experts, hidden=H, inter=INTER, group_size=G):
    """Stacked random quantized weights: gate_up [E, 2I, H] and down [E, H, I], each (packed, scales,
    offsets); |w| is around 0.1."""
    def stacked(n, k):
        parts = [qm.make_weight(name, symmetric, n, k, group_size) for _ in range(num_experts)]
        return tuple(None if parts[0][i] is None else torch.stack([p[i] for p in parts]) for i in range(3))
    return stacked(2 * inter, hidden), stacked(hidden, inter)


def make_routing(tokens, top_k, num_experts, weights_dtype=torch.float32):
    """[T, k] expert indices, distinct per token, drawn from every expert but UNUSED_EXPERT plus the ignore
    index E; positive weights."""
    choices = torch.tensor([e for e in range(num_experts + 1) if e != UNUSED_EXPERT])
    index = torch.stack([choices[torch.randperm(len(choices))[:top_k]] for _ in range(tokens)])
    return index, (0.1 + torch.rand(tokens, top_k)).to(weights_dtype)


def oracle(spec, name, hidden, index, weights, gate_up, down, group_size=G):
    """float64 ``[T, H]``: for each token and slot with e < E, ``w * W_down[e] @ (silu(g) * u)``,
    ``[g, u] = W_gate_up[e] @ x``."""
    num_experts = gate_up[0].shape[0]
    w_gate_up = spec.dequant(name, *gate_up, hidden.shape[1], group_size)
    inter = w_gate_up.shape[1] // 2
    w_down = spec.dequant(name, *down, inter, group_size)
    x = hidden.double().numpy()
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(index.shape[1]):
            e = int(index[t, s])
            if e == num_experts:
                continue
            h = w_gate_up[e] @ x[t]
            gate, up = h[:inter], h[inter:]
            out[t] += float(weights[t, s]) * (w_down[e] @ (gate / (1.0 + np.exp(-gate)) * up))
    return out


def assert_close_to_oracle(y, ref, dtype):
    """``assert_close_to_spec`` of test_quant_matmul.py, or exact zeros where every slot is ignored."""
    if not ref.any():
        assert y.dtype == dtype and (y == 0).all()
    else:
        qm.assert_close_to_spec(y, ref, dtype)


def op_args(hidden, index, weights, gate_up, down, name, group_size=G):
    return (hidden, index, weights, *gate_up, *down, name, group_size)


# -- the raw CPU kernel -------------------------------------------------------------------------------
GUARD = 7.0  # sentinel around the output, to catch writes out of bounds


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
@pytest.mark.usefixtures("simd_level")
def test_cpu_kernel_matches_oracle(spec, name, symmetric, tokens, top_k, num_experts, dtype):
    gate_up, down = make_experts(name, symmetric, num_experts)
    hidden = torch.randn(tokens, H).to(dtype)
    index, weights = make_routing(tokens, top_k, num_experts)
    ref = oracle(spec, name, hidden, index, weights, gate_up, down)
    results = []
    for n_threads in (1, 2, 3):
        pad = 5
        buf = torch.full((tokens * H + 2 * pad,), float("nan"), dtype=dtype)
        buf[:pad] = GUARD
        buf[-pad:] = GUARD
        out = buf[pad : pad + tokens * H].view(tokens, H)
        _core.moe_experts(hidden, index, weights, *gate_up, *down, out, name, G, n_threads)
        assert (buf[:pad] == GUARD).all() and (buf[-pad:] == GUARD).all(), "wrote outside out"
        if (index == num_experts).all(dim=1).any():
            assert (out[(index == num_experts).all(dim=1)] == 0).all()
        assert_close_to_oracle(out, ref, dtype)
        results.append(out.clone())
    assert all(torch.equal(r, results[0]) for r in results), "the result depends on the thread count"


@pytest.mark.parametrize("tokens,top_k,num_experts", [(64, 4, 8), (300, 2, 2)], ids=str)
@pytest.mark.usefixtures("simd_level")
def test_cpu_kernel_gemm_and_chunked_rows(spec, tokens, top_k, num_experts):
    """Enough rows per expert for the GEMM path, and (300 tokens on 2 experts) for several row chunks;
    bitwise the same on 1, 2 and 3 threads."""
    gate_up, down = make_experts("int4", False, num_experts, hidden=128, inter=96)
    hidden = torch.randn(tokens, 128)
    index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    ref = oracle(spec, "int4", hidden, index, weights, gate_up, down)
    outs = []
    for n_threads in (1, 2, 3):
        out = torch.full((tokens, 128), float("nan"))
        _core.moe_experts(hidden, index, weights, *gate_up, *down, out, "int4", G, n_threads)
        qm.assert_close_to_spec(out, ref, torch.float32)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cpu_kernel_all_slots_ignored_and_empty():
    gate_up, down = make_experts("int8", True, 4)
    out = torch.full((3, H), float("nan"))
    _core.moe_experts(torch.randn(3, H), torch.full((3, 2), 4), torch.rand(3, 2), *gate_up, *down, out, "int8", G, 2)
    assert (out == 0).all()
    out = torch.full((3, H), float("nan"), dtype=torch.bfloat16)  # k = 0: no slots at all
    _core.moe_experts(torch.randn(3, H).bfloat16(), torch.zeros(3, 0, dtype=torch.int64), torch.zeros(3, 0),
                     *gate_up, *down, out, "int8", G, 1)
    assert (out == 0).all()
    out = torch.empty(0, H)
    _core.moe_experts(torch.randn(0, H), torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2),
                     *gate_up, *down, out, "int8", G, 1)


# -- the op (torch.ops.metal_marlin.moe_experts) and the reference ------------------------------------
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,symmetric", FORMAT_CASES, ids=str)
def test_op_and_reference_match_oracle(spec, name, symmetric, dtype, weights_dtype):
    num_experts, tokens, top_k = 8, 17, 4
    gate_up, down = make_experts(name, symmetric, num_experts)
    hidden = torch.randn(tokens, H).to(dtype)
    index, weights = make_routing(tokens, top_k, num_experts, weights_dtype)
    index[5] = num_experts  # a token with every slot ignored
    ref = oracle(spec, name, hidden, index, weights, gate_up, down)
    args = op_args(hidden, index, weights, gate_up, down, name)
    y = OP(*args)
    qm.assert_close_to_spec(y, ref, dtype)
    assert (y[5] == 0).all()
    assert torch.equal(moe_experts(*args), y)  # the Python entry point is the same op
    qm.assert_close_to_spec(reference_moe_experts(*args), ref, dtype)


def test_op_non_contiguous_inputs(spec):
    gate_up, down = make_experts("int4", False, 4)
    hidden = torch.randn(H, 10).T[::2]
    index, weights = make_routing(5, 2, 4)
    index, weights = index.T.contiguous().T, weights.T.contiguous().T
    nc = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  same values, other strides
    args = (hidden, index, weights, *map(nc, gate_up), *map(nc, down), "int4", G)
    assert not any(t.is_contiguous() for t in args[:9])
    qm.assert_close_to_spec(OP(*args), oracle(spec, "int4", hidden, index, weights, gate_up, down), torch.float32)


def test_op_group_size_at_least_k_is_per_channel(spec):
    """group_size >= K means one group per row: per-channel weights of projections with different K
    (H=96, I=64) share group_size=96."""
    gate_up, _ = make_experts("int4", False, 4, group_size=96)
    _, down = make_experts("int4", False, 4, group_size=64)
    hidden = torch.randn(3, H)
    index, weights = make_routing(3, 2, 4)
    ref = oracle(spec, "int4", hidden, index, weights, gate_up, down, group_size=96)
    qm.assert_close_to_spec(OP(*op_args(hidden, index, weights, gate_up, down, "int4", 96)), ref, torch.float32)


# -- the module ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [32, -1])
def test_quantized_experts_forward_matches_dense(dtype, group_size):
    """QuantizedExperts (the op) against DenseExperts on its dequantized weights (the per-expert loop)."""
    num_experts, tokens, top_k = 8, 9, 2
    dense = DenseExperts(torch.randn(num_experts, 2 * INTER, H) * 0.1, torch.randn(num_experts, H, INTER) * 0.1,
                         torch.nn.SiLU())
    quantized = QuantizedExperts.from_float(dense, "int4", group_size=group_size)
    twin = DenseExperts(quantized.gate_up_proj.dequantize_weight(), quantized.down_proj.dequantize_weight(),
                        torch.nn.functional.silu)
    hidden = torch.randn(tokens, H).to(dtype)
    index, weights = make_routing(tokens, top_k, num_experts)
    with torch.no_grad():
        got = quantized(hidden, index, weights)
        want = twin(hidden.float(), index, weights)
    torch.testing.assert_close(got.float(), want, rtol=2 * qm.OUT_ROUNDING[dtype] + 1e-5, atol=1e-5)


def test_quantized_experts_other_activation_uses_the_per_expert_loop():
    dense = DenseExperts(torch.randn(4, 2 * INTER, H) * 0.1, torch.randn(4, H, INTER) * 0.1, torch.nn.GELU())
    quantized = QuantizedExperts.from_float(dense, "int8", group_size=32)
    twin = DenseExperts(quantized.gate_up_proj.dequantize_weight(), quantized.down_proj.dequantize_weight(),
                        torch.nn.GELU())
    hidden = torch.randn(5, H)
    index, weights = make_routing(5, 2, 4)
    # The per-expert loop calls quant_matmul, whose int8 GEMV rounds activations to 16-bit fixed point
    # per 32-block on the avx512_vnni path (~2^-16 of a block's largest activation, times sum|w|: up to ~1e-3
    # here where gelu(g) * u cancels).
    with torch.no_grad():
        torch.testing.assert_close(quantized(hidden, index, weights), twin(hidden, index, weights),
                                   rtol=1e-5, atol=1e-3)


# -- torch.compile / fake tensors -----------------------------------------------------------------------
OPCHECK_CASES = [("int4", False, torch.float32), ("int3", True, torch.float16), ("fp4", True, torch.bfloat16)]


@pytest.mark.parametrize("name,symmetric,dtype", OPCHECK_CASES, ids=str)
def test_opcheck(name, symmetric, dtype):
    gate_up, down = make_experts(name, symmetric, 4)
    index, weights = make_routing(6, 2, 4)
    args = op_args(torch.randn(6, H).to(dtype), index, weights, gate_up, down, name)
    # the op has no autograd formula, so the autograd registration test does not apply
    torch.library.opcheck(OP.default, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_meta_tensors_give_the_output_shape():
    gate_up, down = make_experts("int4", False, 4)
    index, weights = make_routing(6, 2, 4)
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    args = op_args(torch.randn(6, H, dtype=torch.bfloat16), index, weights, gate_up, down, "int4")
    y = OP(*(meta(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert y.device.type == "meta" and y.dtype == torch.bfloat16 and tuple(y.shape) == (6, H)


# -- bad input ------------------------------------------------------------------------------------------
def bad_cases():
    e = 4
    (gp, gs, go), (dp, ds, do) = make_experts("int4", False, e)
    (gp8, gs8, _), _ = make_experts("int8", True, e)
    x = torch.randn(3, H)
    idx, w = make_routing(3, 2, e)
    good = dict(hidden=x, top_k_index=idx, top_k_weights=w, gate_up_packed=gp, gate_up_scales=gs, gate_up_offsets=go,
                down_packed=dp, down_scales=ds, down_offsets=do, format="int4", group_size=G)

    def case(exc, pattern, **changes):
        return tuple({**good, **changes}.values()), exc, pattern

    return [
        case(None, None),  # control: valid
        case(TypeError, r"hidden must be float32.*float64", hidden=x.double()),
        case(ValueError, r"hidden must be 2-D", hidden=x[None]),
        case(TypeError, r"top_k_index must be int64.*int32", top_k_index=idx.int()),
        case(ValueError, r"top_k_index must be 2-D \[T=3, k\]", top_k_index=idx[:2]),
        case(TypeError, r"top_k_weights must be floating point", top_k_weights=idx),
        case(ValueError, r"top_k_weights must have top_k_index's shape", top_k_weights=w[:, :1]),
        case(ValueError, r"top_k_index\[1, 0\] = 5 is out of range: expected 0..4",
             top_k_index=torch.tensor([[0, 4], [5, 1], [2, 3]])),
        case(ValueError, r"top_k_index\[2, 1\] = -1 is out of range",
             top_k_index=torch.tensor([[0, 4], [0, 1], [2, -1]])),
        case(ValueError, r"format 'int5'", format="int5"),
        case(ValueError, r"group_size=48", group_size=48),
        case(ValueError, r"gate_up_packed must be 3-D", gate_up_packed=gp[0]),
        case(ValueError, r"gate_up_packed must have an even number of rows", gate_up_packed=gp[:, :-1],
             gate_up_scales=gs[:, :-1], gate_up_offsets=go[:, :-1]),
        case(TypeError, r"gate_up_packed .*int32.*int64", gate_up_packed=gp.long()),
        case(ValueError, r"hidden has K=96 .*gate_up_packed .*192 int4 codes", gate_up_packed=gp8),
        case(ValueError, r"gate_up_scales must be float16.*float32", gate_up_scales=gs.float()),
        case(ValueError, r"gate_up_scales must be 3-D \[E=4", gate_up_scales=gs[:3]),
        case(ValueError, r"gate_up_offsets must be float16", gate_up_offsets=go.float()),
        case(ValueError, r"fp4 takes no gate_up_offsets", format="fp4"),
        # the projections disagree
        case(ValueError, r"down_packed must be 3-D \[E=4", down_packed=dp[:3], down_scales=ds[:3], down_offsets=do[:3]),
        case(ValueError, r"down_packed must have H=96 rows", down_packed=dp[:, :64], down_scales=ds[:, :64],
             down_offsets=do[:, :64]),
        case(ValueError, r"silu\(gate\)\*up has K=64 .*down_packed", down_packed=gp8[:, :96, :12]),
        case(ValueError, r"down_scales must be float16 of shape \(96, 2\).*\(96, 3\)", down_scales=gs[:, :96]),
        case(ValueError, r"down_offsets must be float16", down_offsets=do.float()),
        case(ValueError, r"down_offsets must be 3-D", down_offsets=do[0]),
        case(ValueError, r"down_scales is on meta but hidden is on cpu", down_scales=ds.to("meta")),
        case(ValueError, r"top_k_weights is on meta but hidden is on cpu", top_k_weights=w.to("meta")),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_raises_clear_error(case):
    args, exc, pattern = bad_cases()[case]
    if exc is None:
        OP(*args)
        reference_moe_experts(*args)
        return
    with pytest.raises(exc, match=pattern):
        OP(*args)
    if all(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor)):
        with pytest.raises(exc, match=pattern):
            reference_moe_experts(*args)


def raw_bad_cases():
    e, t = 4, 3
    gate_up, down = make_experts("int4", False, e)
    x = torch.randn(t, H)
    idx, w = make_routing(t, 2, e)
    out = torch.empty(t, H)

    def case(exc, pattern, position, value):
        args = [x, idx, w, *gate_up, *down, out, "int4", G, 1]
        args[position] = value
        return args, exc, pattern

    return [
        case(ValueError, r"unknown format 'int5'", 10, "int5"),
        case(TypeError, r"hidden must be float32", 0, x.double()),
        case(TypeError, r"top_k_index must be int64", 1, idx.int()),
        case(ValueError, r"top_k_index\[0, 1\] = 9", 1, torch.tensor([[0, 9], [1, 2], [3, 4]])),
        case(TypeError, r"top_k_weights must be float32", 2, w.half()),
        case(ValueError, r"top_k_weights must have shape", 2, w[:, :1].contiguous()),
        case(ValueError, r"gate_up_packed must be 3-D", 3, gate_up[0][0]),
        case(ValueError, r"gate_up_scales must have shape", 4, gate_up[1][:, :, :2].contiguous()),
        case(ValueError, r"down_packed must be 3-D \[E=4", 6, down[0][:3].contiguous()),
        case(ValueError, r"down_packed has 12 words per row but K=64", 6, gate_up[0][:, :96].contiguous()),
        case(ValueError, r"down_offsets must have shape", 8, down[2][:, :, :1].contiguous()),
        case(TypeError, r"out must have", 9, out.half()),
        case(ValueError, r"out must have shape", 9, torch.empty(t, H + 1)),
        case(ValueError, r"n_threads", 12, 0),
        case(TypeError, r"incompatible function arguments", 0, x.T.contiguous().T),
    ]


@pytest.mark.parametrize("case", range(len(raw_bad_cases())))
def test_raw_kernel_rejects_bad_input(case):
    """The kernel entry point checks its arguments itself instead of reading out of bounds; a bad index
    is found before anything is written."""
    args, exc, pattern = raw_bad_cases()[case]
    args[9].fill_(GUARD)
    with pytest.raises(exc, match=pattern):
        _core.moe_experts(*args)
    assert (args[9] == GUARD).all()

