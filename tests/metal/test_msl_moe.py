"""shaders/moe.metal (routed SwiGLU experts over group-quantized weights) in the MSL simulator.

Every kernel runs inside the four-dispatch pipeline csrc/metal issues (``moe_experts_msl`` below, see
shaders/moe.h): moe_route -> moe_gate_up_{gemv,gemm}_<fmt> -> moe_down_{gemv,gemm}_<fmt> -> moe_combine,
compared with the reference op ``reference_moe_experts`` (float32 torch math) on weights from the
project's quantizer; moe_route's pair lists are also checked against a stable sort written here.
"""


import numpy as np
import pytest
import torch

from metal_marlin.ops.experts import reference_moe_experts
from metal_marlin.quant import quantize_weight
from tests.metal.msl_testing import HALF_SUBNORMAL_SPACING, SHADERS, UNIT_ROUNDOFF_F16, UNIT_ROUNDOFF_F32
from tests.mslsim import compile_metal

SHADER = SHADERS / "moe.metal"

# (format, symmetric): every group format, with its asymmetric variant where the format has one.
VARIANTS = [("int8", True), ("int8", False), ("int4", True), ("int4", False), ("int3", True), ("int3", False),
            ("int2", True), ("int2", False), ("fp4", True), ("fp8", True)]
PATHS = ("gemv", "gemm")


def suffix(fmt: str, symmetric: bool) -> str:
    return fmt + ("" if symmetric else "_asym")


PIPELINES = [(path, fmt, symmetric) for path in PATHS for fmt, symmetric in VARIANTS]
KERNELS = ["moe_route", "moe_combine"] + [
    f"moe_{projection}_{path}_{suffix(fmt, symmetric)}"
    for path, fmt, symmetric in PIPELINES for projection in ("gate_up", "down")
]

# Launch geometry of shaders/moe.h.
THREADS = 128
ROUTE_THREADS = 256
COMBINE_THREADS = 64
ROWS_PER_ITEM = {"gemv": 8, "gemm": 32}
FEATURES = {("gemv", "gate_up"): 2, ("gemv", "down"): 4, ("gemm", "gate_up"): 32, ("gemm", "down"): 32}
PARAMS = np.dtype([(name, np.uint32) for name in
                   ("tokens", "top_k", "experts", "hidden", "inter", "group_size", "rows_per_item")])

E, H, INTER, G = 6, 96, 64, 64  # K = 96 with group 64: gate_up's last group is short


@pytest.fixture(scope="module")
def lib():
    return compile_metal(SHADER)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def routing(case: str) -> torch.Tensor:
    """int64 [T, k] expert indices (E = ignore). 'decode': one token with an ignored slot; 'crowded': 11
    tokens whose slot 0 is expert 0 (more rows than a gemv item) and one token routed twice to expert 3;
    'prefill': 40 tokens all on expert 1 (a full 32-row item and a ragged one). Expert 4 is never used."""
    gen = torch.Generator().manual_seed(len(case))
    if case == "decode":
        return torch.tensor([[5, 0, E, 2]])
    others = torch.tensor([2, 3, 5, E])
    if case == "crowded":
        index = torch.stack([torch.zeros(11, dtype=torch.int64), others[torch.randint(0, 4, (11,), generator=gen)]], 1)
        index[3] = torch.tensor([3, 3])
        return index
    rest = torch.stack([others[torch.randperm(4, generator=gen)[:2]] for _ in range(40)])
    return torch.cat([torch.ones(40, 1, dtype=torch.int64), rest], 1)


CASES = {"gemv": ("decode", "crowded"), "gemm": ("decode", "prefill")}


def route(lib, index: torch.Tensor, rows_per_item: int, params: np.void) -> dict[str, np.ndarray]:
    pairs = index.numel()
    max_items = pairs // rows_per_item + min(E, pairs)
    out = {"sorted_pairs": np.full(pairs, -7, np.int32), "pair_position": np.full(pairs, -7, np.int32),
           "items": np.zeros((max_items, 4), np.uint32), "item_count": np.zeros(1, np.uint32)}
    lib.run("moe_route", grid=(1, 1, 1), threadgroup=(ROUTE_THREADS, 1, 1), schedule="all", buffers={
        0: index.to(torch.int32).numpy().ravel(), 1: out["sorted_pairs"], 2: out["pair_position"],
        3: out["items"], 4: out["item_count"], 5: params})
    return out


def moe_experts_msl(lib, path: str, variant: str, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    gate_up, down) -> torch.Tensor:
    """out (half [T, H]) from the four dispatches of the Metal host (hidden half [T, H])."""
    tokens, top_k = index.shape
    pairs = tokens * top_k
    rows_per_item = ROWS_PER_ITEM[path]
    params = np.array([(tokens, top_k, E, H, INTER, G, rows_per_item)], PARAMS)[0]
    routed = route(lib, index, rows_per_item, params)
    max_items = routed["items"].shape[0]
    unused = np.zeros(1, np.float16)

    def matmul(projection: str, x: np.ndarray, weight, n_out: int) -> np.ndarray:
        out = np.full((pairs, n_out), np.nan, np.float32)
        lib.run(f"moe_{projection}_{path}_{variant}", grid=(cdiv(n_out, FEATURES[path, projection]), max_items, 1),
                threadgroup=(THREADS, 1, 1), schedule="all", buffers={
                    0: x, 1: weight.packed.numpy().view(np.uint32), 2: weight.scales.numpy(),
                    3: unused if weight.offsets is None else weight.offsets.numpy(),
                    4: routed["sorted_pairs"], 5: routed["items"], 6: routed["item_count"], 7: out, 8: params})
        return out

    act = matmul("gate_up", hidden.numpy(), gate_up, INTER)
    expert_out = matmul("down", act, down, H)
    out = np.full((tokens, H), np.nan, np.float16)
    lib.run("moe_combine", grid=(cdiv(H, 4 * COMBINE_THREADS), tokens, 1), threadgroup=(COMBINE_THREADS, 1, 1),
            schedule="all", buffers={0: expert_out, 1: routed["pair_position"],
                                     2: weights.float().numpy(), 3: out, 4: params})
    return torch.from_numpy(out)


def error_bound(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                w_down: torch.Tensor) -> torch.Tensor:
    """First-order bound (float64 [T, H]) on |kernel's float32 result - reference's| before the rounding
    to half. Each sum of n products is computed in another order by the two, both within (n + 2) u32 of
    exact relative to the magnitudes of the terms; SwiGLU propagates gate errors with |silu'| <= 1.1 and
    adds 8 u32 (exp, division, product); the combine adds the top_k slots in slot order."""
    gamma = lambda terms: 2 * (terms + 2) * UNIT_ROUNDOFF_F32  # noqa: E731
    x = x.double()
    bound = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(index.shape[0]):
        for s in range(index.shape[1]):
            e = int(index[t, s])
            if e == E:
                continue
            gate, up = (w_gate_up[e] @ x[t]).chunk(2)
            gate_mag, up_mag = (w_gate_up[e].abs() @ x[t].abs()).chunk(2)
            silu = gate / (1 + torch.exp(-gate))
            act = silu * up
            act_err = (1.1 * gamma(H) * gate_mag * up.abs() + silu.abs() * gamma(H) * up_mag
                       + 8 * UNIT_ROUNDOFF_F32 * act.abs())
            y_err = w_down[e].abs() @ act_err + gamma(INTER) * (w_down[e].abs() @ act.abs())
            weight = abs(float(weights[t, s]))
            bound[t] += weight * y_err + gamma(index.shape[1]) * weight * (w_down[e] @ act).abs()
    return bound


@pytest.fixture(scope="module")
def experts():
    """Random float weights quantized on demand per variant (the project's quantizer, absmax scales to
    keep the test fast): get(fmt, symmetric) -> (gate_up, down)."""
    cache = {}

    def get(fmt: str, symmetric: bool):
        if (fmt, symmetric) not in cache:
            gen = torch.Generator().manual_seed(len(cache))
            w_gate_up = 0.1 * torch.randn(E, 2 * INTER, H, generator=gen)
            w_down = 0.1 * torch.randn(E, H, INTER, generator=gen)
            cache[fmt, symmetric] = tuple(quantize_weight(w, fmt, group_size=G, symmetric=symmetric,
                                                          scale_method="absmax")
                                          for w in (w_gate_up, w_down))
        return cache[fmt, symmetric]

    return get


def test_every_kernel_is_instantiated(lib):
    assert sorted(lib.kernel_names) == sorted(KERNELS)


@pytest.mark.parametrize(("path", "fmt", "symmetric"), PIPELINES,
                         ids=[f"{path}_{suffix(f, s)}" for path, f, s in PIPELINES])
def test_pipeline_matches_reference(lib, experts, path, fmt, symmetric):
    gate_up, down = experts(fmt, symmetric)
    for case in CASES[path]:
        index = routing(case)
        tokens = index.shape[0]
        hidden = torch.randn(tokens, H).half()
        weights = 0.1 + torch.rand(index.shape)
        out = moe_experts_msl(lib, path, suffix(fmt, symmetric), hidden, index, weights, gate_up, down)
        ref = reference_moe_experts(hidden.float(), index, weights, gate_up.packed, gate_up.scales, gate_up.offsets,
                                    down.packed, down.scales, down.offsets, fmt, G)
        float_error = error_bound(hidden, index, weights, gate_up.dequantize(torch.float64),
                                  down.dequantize(torch.float64))
        tol = UNIT_ROUNDOFF_F16 * (ref.double().abs() + float_error) + float_error + HALF_SUBNORMAL_SPACING / 2
        assert torch.isfinite(out).all(), "non-finite output (an unwritten NaN-filled element?)"
        err = (out.double() - ref.double()).abs()
        worst = int(torch.argmax(err - tol))
        assert (err <= tol).all(), (f"{case}: |out - ref| exceeds the bound at flat index {worst}: "
                                    f"out={out.flatten()[worst]} ref={ref.flatten()[worst]} tol={tol.flatten()[worst]}")


@pytest.mark.parametrize("case", ["decode", "crowded", "prefill"])
@pytest.mark.parametrize("rows_per_item", [8, 32])
def test_route_is_a_stable_sort_by_expert(lib, case, rows_per_item):
    index = routing(case)
    pairs = index.numel()
    params = np.array([(index.shape[0], index.shape[1], E, H, INTER, G, rows_per_item)], PARAMS)[0]
    routed = route(lib, index, rows_per_item, params)

    flat = index.flatten()
    active = torch.nonzero(flat < E).flatten()
    order = active[torch.argsort(flat[active], stable=True)]
    assert routed["sorted_pairs"][: len(order)].tolist() == order.tolist()
    position = torch.full((pairs,), -1, dtype=torch.int64)
    position[order] = torch.arange(len(order))
    assert routed["pair_position"].tolist() == position.tolist()
    expected_items = []
    for e in range(E):
        first = int((flat[active] < e).sum())
        count = int((flat == e).sum())
        expected_items += [(e, first + r, min(rows_per_item, count - r), 0) for r in range(0, count, rows_per_item)]
    count = int(routed["item_count"][0])
    assert count == len(expected_items)
    assert [tuple(item) for item in routed["items"][:count].tolist()] == expected_items
