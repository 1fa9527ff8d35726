"""The MPS kernels of the ops, run on CPU tensors with their launches sent to the MSL simulator.

Each op's MPS kernel (``*_metal`` in metal_marlin/ops, registered for "mps" on macOS builds) is
device-agnostic apart from ``metal.dispatch``: here ``dispatch`` runs each launch (kernel, grid,
threadgroup, buffers, parameter bytes) in the simulator instead of encoding it, so everything a Mac
does in Python (dtype conversions, the plan, the intermediates) runs here, and only the encoder in
csrc/metal/metal_runtime.mm does not. Deterministic mode makes ``torch.empty`` return NaN (integers:
their maximum), so an output or intermediate a kernel should have written and did not shows.

The kernels' numerics are bounded tightly by tests/metal/test_msl_*.py; the question here is whether
the host drives them as they expect, and a wrong launch gives NaN, a fault or errors of the order of
the output. Tolerance: the kernels' float32 sums differ from the reference's in order only (~1e-6
relative at these sizes) and both round to half once: rtol 2^-10 plus atol 2^-9 * max|reference|.
"""

import pytest
import torch

from metal_marlin.formats.hadamard import hadamard_transform
from metal_marlin.ops import attention, experts, group_matmul, metal
from metal_marlin.ops import trellis as trellis_ops
from metal_marlin.quant import quantize_weight
from tests.metal.msl_testing import SHADERS, paged
from tests.mslsim import compile_metal


@pytest.fixture(scope="module")
def libraries() -> dict:
    """Kernel host name -> the compiled shader file defining it."""
    return {name: lib for path in sorted(SHADERS.glob("*.metal")) for lib in [compile_metal(path)]
            for name in lib.kernel_names}


@pytest.fixture
def launched(monkeypatch, libraries) -> list[str]:
    """Routes metal.dispatch to the simulator; the names of the kernels run, in order."""
    names: list[str] = []

    def simulate(launches: list[metal.Launch]) -> None:
        for launch in launches:
            names.append(launch.kernel)
            libraries[launch.kernel].run(launch.kernel, grid=launch.grid, threadgroup=launch.threadgroup,
                                         buffers={**launch.buffers, **launch.constants},
                                         threadgroup_memory=launch.threadgroup_memory, schedule="forward")

    monkeypatch.setattr(metal, "dispatch", simulate)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty fills NaN / the integer maximum
    yield names
    torch.use_deterministic_algorithms(deterministic)


def assert_matches(out: torch.Tensor, reference: torch.Tensor) -> None:
    assert out.dtype == reference.dtype and out.shape == reference.shape
    reference = reference.float()
    scale = reference.abs().max().item() or 1.0
    torch.testing.assert_close(out.float(), reference, rtol=2.0**-10, atol=2.0**-9 * scale)


# (format, symmetric, x shape, K, N, group_size, bias, x dtype): GEMV (<= 8 rows, leading dims
# flattened) and GEMM, ragged N and M tiles, float32/bfloat16 activations converted to half and back.
QUANT_CASES = [("int4", True, (1,), 96, 13, 32, True, torch.float16),
               ("int4", False, (2, 3), 128, 40, 64, False, torch.float32),
               ("int3", False, (3,), 96, 7, 96, False, torch.float16),
               ("fp8", True, (33,), 64, 35, 32, True, torch.bfloat16)]


@pytest.mark.parametrize("fmt, symmetric, lead, k, n, group_size, has_bias, dtype", QUANT_CASES)
def test_quant_matmul(launched, fmt, symmetric, lead, k, n, group_size, has_bias, dtype):
    qw = quantize_weight(0.1 * torch.randn(n, k), fmt, group_size=group_size, symmetric=symmetric)
    x = torch.randn(*lead, k).to(dtype)
    bias = torch.randn(n).half() if has_bias else None
    args = (qw.packed, qw.scales, qw.offsets, bias, fmt, group_size)
    out = group_matmul.quant_matmul_metal(x, *args)
    rows = x.numel() // k
    assert launched == [group_matmul.quant_matmul_kernel(fmt, not symmetric, rows)]
    assert_matches(out, group_matmul.reference_quant_matmul(x.half(), *args).to(dtype))


@pytest.mark.parametrize("dtype, shape, block", [(torch.float16, (3, 96), 32), (torch.float32, (2, 1024), 512),
                                                 (torch.bfloat16, (2, 2, 64), 16)])
def test_hadamard(launched, dtype, shape, block):
    x = torch.randn(shape).to(dtype)
    out = trellis_ops.hadamard_metal(x, block)
    assert launched == [trellis_ops.hadamard_kernel("half" if dtype == torch.float16 else "float", block)]
    assert_matches(out, hadamard_transform(x.float(), block).to(dtype))


def test_hadamard_above_the_instantiated_blocks_runs_the_reference(launched):
    x = torch.randn(2, 2048)
    torch.testing.assert_close(trellis_ops.hadamard_metal(x, 1024), hadamard_transform(x, 1024))
    assert launched == []


@pytest.mark.parametrize("m, has_bias, dtype", [(1, True, torch.float32), (9, False, torch.float16)])
def test_trellis_matmul(launched, m, has_bias, dtype):
    tw = quantize_weight(torch.randn(96, 192), "trellis", bits=3, codebook="3inst")
    x = torch.randn(m, 192).to(dtype)
    bias = torch.randn(96).half() if has_bias else None
    args = (tw.trellis, tw.su, tw.sv, bias, tw.bits, tw.codebook, tw.had_in, tw.had_out)
    out = trellis_ops.trellis_matmul_metal(x, *args)
    assert launched == [trellis_ops.hadamard_kernel("in", tw.had_in), trellis_ops.trellis_matmul_kernel("3inst", 3, m),
                        trellis_ops.hadamard_kernel("out", tw.had_out)]
    assert_matches(out, trellis_ops.reference_trellis_matmul(x.half(), *args).to(dtype))


@pytest.mark.parametrize("tokens, fmt, symmetric", [(3, "int4", True), (9, "int8", False)])
def test_moe_experts(launched, tokens, fmt, symmetric):
    num_experts, hidden, inter, top_k, group_size = 4, 64, 32, 2, 32
    gate_up = quantize_weight(0.1 * torch.randn(num_experts, 2 * inter, hidden), fmt, group_size=group_size,
                              symmetric=symmetric)
    down = quantize_weight(0.1 * torch.randn(num_experts, hidden, inter), fmt, group_size=group_size,
                           symmetric=symmetric)
    x = torch.randn(tokens, hidden).half()
    index = torch.randint(0, num_experts, (tokens, top_k))
    index[0, 1] = num_experts  # a slot to ignore
    args = (x, index, torch.rand(tokens, top_k), gate_up.packed, gate_up.scales, gate_up.offsets, down.packed,
            down.scales, down.offsets, fmt, group_size)
    out = experts.moe_experts_metal(*args)
    assert launched == ["moe_route",
                        experts.moe_matmul_kernel("gate_up", fmt, not symmetric, tokens),
                        experts.moe_matmul_kernel("down", fmt, not symmetric, tokens), "moe_combine"]
    assert_matches(out, experts.reference_moe_experts(*args))


CONTEXT_LENS = [5, 0, 40]


@pytest.mark.parametrize("head_dim", [64, 40])  # 40: no instantiation, the reference runs
def test_paged_attention_decode(launched, head_dim):
    num_kv_heads, group = 2, 3
    q = torch.randn(len(CONTEXT_LENS), num_kv_heads * group, head_dim).half()
    kv = [torch.randn(n, 2, num_kv_heads, head_dim).half() for n in CONTEXT_LENS]  # keys and values side by side
    pool, table = paged(kv, 16)
    args = (q, pool[:, :, 0].contiguous(), pool[:, :, 1].contiguous(), table,
            torch.tensor(CONTEXT_LENS, dtype=torch.int32), 0.125)
    out = attention.paged_attention_decode_metal(*args)
    assert launched == ([attention.gqa_decode_kernel(head_dim)] if head_dim in attention.HEAD_DIMS else [])
    assert_matches(out, attention.reference_paged_attention_decode(*args))


def test_mla_attention_decode(launched):
    num_heads, rank, rope = 11, 64, 16
    q_latent = torch.randn(len(CONTEXT_LENS), num_heads, rank).half()
    q_rope = torch.randn(len(CONTEXT_LENS), num_heads, rope).half()
    cache, table = paged([(2 * torch.rand(n, rank + rope) - 1).half() for n in CONTEXT_LENS], 16)
    args = (q_latent, q_rope, cache, table, torch.tensor(CONTEXT_LENS, dtype=torch.int32), 0.1)
    out = attention.mla_attention_decode_metal(*args)
    assert launched == [attention.mla_decode_kernel(rank, rope)]
    assert_matches(out, attention.reference_mla_attention_decode(*args))


@pytest.mark.parametrize("kv_len", [50, 0])
def test_flash_attention_prefill(launched, kv_len):
    q = torch.randn(2, 13, 6, 64).half()
    k, v = torch.randn(2, kv_len, 2, 64).half(), torch.randn(2, kv_len, 2, 64).half()
    causal_offset = max(kv_len - 13, 0)
    out = attention.flash_attention_prefill_metal(q, k, v, causal_offset, 0.125)
    assert launched == ([attention.flash_prefill_kernel(64)] if kv_len else [])
    assert_matches(out, attention.reference_flash_attention_prefill(q, k, v, causal_offset, 0.125))
