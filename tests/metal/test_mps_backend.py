"""The Metal backend on a real Apple GPU: every op on ``device="mps"`` (the compiled metallib, the ObjC++
dispatch on PyTorch's MPS stream) against its pure-torch reference on the CPU.

Run on a Mac (docs/verification.md):  python -m pytest tests/metal/test_mps_backend.py -v

Skipped, with that reason, only where torch has no MPS device (Linux CI, which checks the same launches
in the MSL simulator: test_launch_plans.py). On a Mac with MPS, a build without the Metal backend fails
here instead of skipping.

Tolerance: the GPU and the reference see the same float16 inputs; the kernels accumulate in float
(in another order, and Apple's exp2/division may differ from IEEE in the last bits) and round the
output to half once, as the reference does: rtol 2^-9 plus atol 2^-8 * max|reference| (a few half ulps
at the top magnitude). A wrong launch or dispatch gives NaN, garbage or stale memory, far outside it.
"""

import pytest
import torch

from metal_marlin import _core
from metal_marlin.formats.hadamard import hadamard_transform
from metal_marlin.ops import attention, experts, group_matmul, metal, trellis
from metal_marlin.quant import quantize_weight
from tests.metal.msl_testing import paged

pytestmark = pytest.mark.skipif(not torch.backends.mps.is_available(),
                                reason="needs an Apple GPU: torch.backends.mps.is_available() is False")

MPS = "mps"


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    """The kernels dispatched (through the real dispatch), so a test knows Metal ran and not a fallback."""
    names: list[str] = []
    dispatch = metal.dispatch

    def record(launches: list[metal.Launch]) -> None:
        names.extend(launch.kernel for launch in launches)
        dispatch(launches)

    monkeypatch.setattr(metal, "dispatch", record)
    return names


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.device.type == MPS
    reference = reference.float()
    scale = reference.abs().max().item() or 1.0
    torch.testing.assert_close(out.cpu().float(), reference, rtol=2.0**-9, atol=2.0**-8 * scale)


def on_mps(*tensors):
    return [None if t is None else t.to(MPS) for t in tensors]


def test_the_build_has_metal():
    assert _core.has_metal(), "this macOS build has no Metal backend (built with METAL_MARLIN_METAL=OFF?)"


def test_the_metallib_holds_every_kernel_the_host_launches():
    library = set(_core.metal.kernel_names())
    launched = {name for module in (group_matmul, trellis, experts, attention) for name in module.METAL_KERNELS}
    assert sorted(launched - library) == [] and sorted(library - launched) == []


# ---- quant_matmul: every format, symmetric and asymmetric, GEMV and GEMM paths -------------------------

QUANT_VARIANTS = [("int8", True), ("int8", False), ("int4", True), ("int4", False), ("int3", True),
                  ("int3", False), ("int2", True), ("int2", False), ("fp4", True), ("fp8", True)]


@pytest.mark.parametrize("m", [1, 5, 8, 9, 64])
@pytest.mark.parametrize("fmt, symmetric", QUANT_VARIANTS)
def test_quant_matmul(launched, fmt, symmetric, m):
    n, k, group_size = 300, 576, 128  # ragged N tile, a shorter last group
    qw = quantize_weight(0.05 * torch.randn(n, k), fmt, group_size=group_size, symmetric=symmetric)
    x, bias = torch.randn(m, k).half(), torch.randn(n).half()
    args = (qw.packed, qw.scales, qw.offsets, bias, fmt, group_size)
    out = torch.ops.metal_marlin.quant_matmul(*on_mps(x, *args[:4]), *args[4:])
    assert launched == [group_matmul.quant_matmul_kernel(fmt, not symmetric, m)]
    assert_matches(out, group_matmul.reference_quant_matmul(x, *args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_converts_other_activation_dtypes(dtype):
    qw = quantize_weight(0.05 * torch.randn(64, 256), "int4", group_size=128)
    x = torch.randn(3, 256).to(dtype)
    out = torch.ops.metal_marlin.quant_matmul(*on_mps(x, qw.packed, qw.scales), None, None, "int4", 128)
    assert out.dtype == dtype
    assert_matches(out, group_matmul.reference_quant_matmul(x.half(), qw.packed, qw.scales, None, None, "int4", 128))


# ---- hadamard and trellis_matmul -------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2, 16, 128, 256, 512])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_hadamard(launched, dtype, block):
    x = torch.randn(7, 1536).to(dtype)
    out = torch.ops.metal_marlin.hadamard(x.to(MPS), block)
    assert launched == [trellis.hadamard_kernel("half" if dtype == torch.float16 else "float", block)]
    assert out.dtype == dtype
    assert_matches(out, hadamard_transform(x.float(), block).to(dtype))


@pytest.mark.parametrize("m", [1, 8, 9, 70])
@pytest.mark.parametrize("codebook, bits", [("3inst", 2), ("3inst", 4), ("1mad", 3), ("mcg", 5), ("mul1", 8)])
def test_trellis_matmul(launched, codebook, bits, m):
    tw = quantize_weight(torch.randn(256, 512), "trellis", bits=bits, codebook=codebook)
    x, bias = torch.randn(m, 512).half(), torch.randn(256).half()
    args = (tw.trellis, tw.su, tw.sv, bias)
    settings = (tw.bits, tw.codebook, tw.had_in, tw.had_out)
    out = torch.ops.metal_marlin.trellis_matmul(*on_mps(x, *args), *settings)
    assert launched[1] == trellis.trellis_matmul_kernel(codebook, bits, m)
    assert_matches(out, trellis.reference_trellis_matmul(x, *args, *settings))


# ---- moe_experts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 8, 9, 100])
@pytest.mark.parametrize("fmt, symmetric", [("int4", True), ("int4", False), ("int3", True), ("fp8", True)])
def test_moe_experts(launched, fmt, symmetric, tokens):
    num_experts, hidden, inter, top_k, group_size = 16, 256, 128, 4, 64
    gate_up = quantize_weight(0.05 * torch.randn(num_experts, 2 * inter, hidden), fmt, group_size=group_size,
                              symmetric=symmetric)
    down = quantize_weight(0.05 * torch.randn(num_experts, hidden, inter), fmt, group_size=group_size,
                           symmetric=symmetric)
    x = torch.randn(tokens, hidden).half()
    index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
    index[0, -1] = num_experts  # a slot to ignore
    weights = torch.rand(tokens, top_k)
    args = (x, index, weights, gate_up.packed, gate_up.scales, gate_up.offsets, down.packed, down.scales,
            down.offsets)
    out = torch.ops.metal_marlin.moe_experts(*on_mps(*args), fmt, group_size)
    assert launched == ["moe_route", experts.moe_matmul_kernel("gate_up", fmt, not symmetric, tokens),
                        experts.moe_matmul_kernel("down", fmt, not symmetric, tokens), "moe_combine"]
    assert_matches(out, experts.reference_moe_experts(*args, fmt, group_size))


# ---- attention ------------------------------------------------------------------------------------------------


CONTEXT_LENS = [1, 300, 0, 1000, 64]


@pytest.mark.parametrize("head_dim", attention.HEAD_DIMS)
@pytest.mark.parametrize("num_kv_heads, group", [(8, 4), (2, 6), (4, 1)])
def test_paged_attention_decode(launched, head_dim, num_kv_heads, group):
    q = torch.randn(len(CONTEXT_LENS), num_kv_heads * group, head_dim).half()
    kv = [torch.randn(n, 2, num_kv_heads, head_dim).half() for n in CONTEXT_LENS]
    pool, table = paged(kv, 16)
    k_cache, v_cache = pool[:, :, 0].contiguous(), pool[:, :, 1].contiguous()
    args = (q, k_cache, v_cache, table, torch.tensor(CONTEXT_LENS, dtype=torch.int32))
    out = torch.ops.metal_marlin.paged_attention_decode(*on_mps(*args), head_dim**-0.5)
    assert launched == [attention.gqa_decode_kernel(head_dim)]
    assert_matches(out, attention.reference_paged_attention_decode(*args, head_dim**-0.5))


@pytest.mark.parametrize("rank, rope", attention.MLA_SHAPES)
def test_mla_attention_decode(launched, rank, rope):
    num_heads, scale = 20, 192**-0.5
    q_latent = (0.2 * torch.randn(len(CONTEXT_LENS), num_heads, rank)).half()
    q_rope = (0.2 * torch.randn(len(CONTEXT_LENS), num_heads, rope)).half()
    cache, table = paged([(2 * torch.rand(n, rank + rope) - 1).half() for n in CONTEXT_LENS], 32)
    args = (q_latent, q_rope, cache, table, torch.tensor(CONTEXT_LENS, dtype=torch.int32))
    out = torch.ops.metal_marlin.mla_attention_decode(*on_mps(*args), scale)
    assert launched == [attention.mla_decode_kernel(rank, rope)]
    assert_matches(out, attention.reference_mla_attention_decode(*args, scale))


@pytest.mark.parametrize("head_dim", attention.HEAD_DIMS)
@pytest.mark.parametrize("q_len, kv_len, causal_offset", [(300, 300, 0), (13, 500, 487), (1, 129, 128)])
def test_flash_attention_prefill(launched, head_dim, q_len, kv_len, causal_offset):
    q = torch.randn(2, q_len, 8, head_dim).half()
    k, v = torch.randn(2, kv_len, 2, head_dim).half(), torch.randn(2, kv_len, 2, head_dim).half()
    out = torch.ops.metal_marlin.flash_attention_prefill(*on_mps(q, k, v), causal_offset, head_dim**-0.5)
    assert launched == [attention.flash_prefill_kernel(head_dim)]
    assert_matches(out, attention.reference_flash_attention_prefill(q, k, v, causal_offset, head_dim**-0.5))


# ---- the dispatch: ordering with PyTorch's own MPS work, many launches without a sync --------------------


def test_kernels_are_ordered_with_pytorch_ops_on_the_stream():
    """torch writes each input of our kernel and reads each output, in a chain with one sync at the end;
    every output must be the op of the input torch wrote just before it (stale or early reads differ)."""
    qw = quantize_weight(0.05 * torch.randn(512, 1024), "int4", group_size=128)
    packed, scales = on_mps(qw.packed, qw.scales)
    y = torch.randn(4, 1024, device=MPS).half()
    inputs, outputs = [], []
    for _ in range(20):
        z = torch.sin(y) * 2.0  # a fresh allocation, often memory torch just freed
        out = torch.ops.metal_marlin.quant_matmul(z, packed, scales, None, None, "int4", 128)
        inputs.append(z)
        outputs.append(out)
        y = torch.cat([out, out.flip(1)], dim=1)
    torch.mps.synchronize()
    for z, out in zip(inputs, outputs, strict=True):
        assert_matches(out, group_matmul.reference_quant_matmul(z.cpu(), qw.packed, qw.scales, None, None, "int4",
                                                                128))


def test_many_launches_share_the_stream_encoder():
    """Hundreds of dispatches of ours interleaved with torch's Metal kernels and an MPSGraph matmul, with
    no sync in between: the shared compute encoder must never be doubled ("A command encoder is already
    encoding" aborts the process)."""
    x = torch.randn(1, 256, device=MPS).half()
    w = torch.randn(256, 256, device=MPS).half()
    for _ in range(300):
        x = torch.ops.metal_marlin.hadamard(x, 128)
        x = torch.sin(x) @ w * 0.01
    torch.mps.synchronize()
    assert torch.isfinite(x).all()
