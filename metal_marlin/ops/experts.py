"""``metal_marlin::moe_experts``: the routed SwiGLU experts of a MoE layer with group-quantized weights.

``out[t] = sum_s top_k_weights[t, s] * down[e] @ (silu(gate) * up)`` with ``[gate, up] = gate_up[e] @
hidden[t]`` and ``e = top_k_index[t, s]``; an index equal to the number of experts ``E`` marks a slot to
ignore (transformers' convention). ``gate_up`` is stacked ``[E, 2I, H]`` (gate rows, then up rows) and
``down`` ``[E, H, I]``, in one format and group size (docs/formats.md).

Declared once here; the pure-torch reference (float32 math) is the default implementation and the
oracle; the fused CPU kernel in ``_core`` (sorting, gathering, both matmuls, SwiGLU and the weighted sum
in C++) and the fake kernel are registered beside it.
"""

from __future__ import annotations

import re

import torch

from .. import _core
from ..formats import GROUP_FORMATS, GroupQuantizedWeight, get_format
from . import metal
from .group_matmul import ACTIVATION_DTYPES, check_quant_matmul_args
from .metal import Launch, ParamsStruct, cdiv


def _check_projection(projection: str, x_name: str, x: torch.Tensor, num_experts: int, packed: torch.Tensor,
                      scales: torch.Tensor, offsets: torch.Tensor | None, format: str, group_size: int) -> None:
    """The stacked ``[E, N, ...]`` tensors of one projection: their expert dimension here, the rest by
    quant_matmul's checks on expert 0, with its messages naming this op's arguments."""
    for part, t in (("packed", packed), ("scales", scales), ("offsets", offsets)):
        if t is not None and (t.dim() != 3 or t.shape[0] != num_experts):
            raise ValueError(f"moe_experts: {projection}_{part} must be 3-D [E={num_experts}, N, ...], "
                             f"got shape {tuple(t.shape)}")
    try:
        check_quant_matmul_args(x, packed[0], scales[0], None if offsets is None else offsets[0], None, format,
                                group_size)
    except (TypeError, ValueError) as err:
        message = re.sub(r"\b(packed|scales|offsets)\b", rf"{projection}_\1", str(err))
        message = message.replace("quant_matmul: ", "moe_experts: ", 1).replace("but x is on", "but hidden is on")
        message = re.sub(r"\bx\b", x_name, message)
        raise type(err)(f"{message} (shapes per expert)" if "shape" in message else message) from None


def check_moe_experts_args(hidden, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_offsets,
                           down_packed, down_scales, down_offsets, format, group_size) -> None:
    """Raise a clear error naming the argument for inputs no backend can take (the op's arguments, see
    ``reference_moe_experts``). Shapes, dtypes and devices only: the range of ``top_k_index`` is data,
    checked by the backends that read it."""
    if hidden.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"moe_experts: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() != 2:
        raise ValueError(f"moe_experts: hidden must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    tokens, hidden_dim = hidden.shape
    if top_k_index.dtype != torch.int64:
        raise TypeError(f"moe_experts: top_k_index must be int64, got {top_k_index.dtype}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens:
        raise ValueError(f"moe_experts: top_k_index must be 2-D [T={tokens}, k], got shape {tuple(top_k_index.shape)}")
    if not top_k_weights.is_floating_point():
        raise TypeError(f"moe_experts: top_k_weights must be floating point, got {top_k_weights.dtype}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"moe_experts: top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
                         f"got {tuple(top_k_weights.shape)}")
    for arg_name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if t.device != hidden.device:
            raise ValueError(f"moe_experts: {arg_name} is on {t.device} but hidden is on {hidden.device}")
    if gate_up_packed.dim() != 3 or gate_up_packed.shape[0] == 0:
        raise ValueError(f"moe_experts: gate_up_packed must be 3-D [E, 2I, H*bits/32] with E >= 1, "
                         f"got shape {tuple(gate_up_packed.shape)}")
    num_experts, two_i = gate_up_packed.shape[:2]
    if two_i % 2:
        raise ValueError(f"moe_experts: gate_up_packed must have an even number of rows 2I (gate, then up), "
                         f"got {two_i}")
    _check_projection("gate_up", "hidden", hidden, num_experts, gate_up_packed, gate_up_scales, gate_up_offsets,
                      format, group_size)
    if down_packed.dim() == 3 and down_packed.shape[1] != hidden_dim:
        raise ValueError(f"moe_experts: down_packed must have H={hidden_dim} rows per expert (hidden's size), "
                         f"got shape {tuple(down_packed.shape)}")
    intermediate = hidden.new_empty((0, two_i // 2))
    _check_projection("down", "silu(gate)*up", intermediate, num_experts, down_packed, down_scales,
                      down_offsets, format, group_size)


def check_expert_indices(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Every index in ``[0, E]`` (``E``: ignore). Reads the data (a host sync off the CPU)."""
    bad = (top_k_index < 0) | (top_k_index > num_experts)
    if bad.any():
        t, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"moe_experts: top_k_index[{t}, {s}] = {int(top_k_index[t, s])} is out of range: "
                         f"expected 0..{num_experts} ({num_experts} = num_experts marks a slot to ignore)")


def _expert_weight(format: str, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                   group_size: int, k: int, expert: int) -> torch.Tensor:
    """Expert ``expert``'s dense float32 ``[N, K]`` weight."""
    return GroupQuantizedWeight(get_format(format), (packed.shape[1], k), packed[expert], scales[expert],
                                None if offsets is None else offsets[expert], group_size).dequantize(torch.float32)


def reference_moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_offsets: torch.Tensor | None,
    down_packed: torch.Tensor,
    down_scales: torch.Tensor,
    down_offsets: torch.Tensor | None,
    format: str,
    group_size: int,
) -> torch.Tensor:
    """Routed SwiGLU experts ``[T, H]`` of ``hidden [T, H]`` (module docstring); ``top_k_index`` int64
    ``[T, k]`` in ``[0, E]``, ``top_k_weights`` ``[T, k]``. The reference: each active expert dequantized in
    pure torch, then float32 SwiGLU; works on any device; result in hidden's dtype."""
    check_moe_experts_args(hidden, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_offsets,
                           down_packed, down_scales, down_offsets, format, group_size)
    num_experts, two_i = gate_up_packed.shape[:2]
    check_expert_indices(top_k_index, num_experts)
    x = hidden.float()
    out = torch.zeros_like(x)
    for expert in top_k_index.unique().tolist():
        if expert == num_experts:
            continue
        token, slot = torch.where(top_k_index == expert)
        w_gate_up = _expert_weight(format, gate_up_packed, gate_up_scales, gate_up_offsets, group_size,
                                   hidden.shape[1], expert)
        w_down = _expert_weight(format, down_packed, down_scales, down_offsets, group_size, two_i // 2, expert)
        gate, up = (x[token] @ w_gate_up.T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w_down.T
        out.index_add_(0, token, y * top_k_weights[token, slot].float().unsqueeze(-1))
    return out.to(hidden.dtype)


# The declaration: the schema comes from the reference's annotations, and the reference is the default
# implementation (any device).
moe_experts = torch.library.custom_op("metal_marlin::moe_experts", reference_moe_experts, mutates_args=())


@moe_experts.register_kernel("cpu")
def _moe_experts_cpu(hidden, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_offsets,
                     down_packed, down_scales, down_offsets, format, group_size):
    check_moe_experts_args(hidden, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_offsets,
                           down_packed, down_scales, down_offsets, format, group_size)
    contiguous = lambda t: None if t is None else t.contiguous()  # noqa: E731
    out = torch.empty(hidden.shape, dtype=hidden.dtype)
    _core.moe_experts(
        hidden.contiguous(), top_k_index.contiguous(), top_k_weights.float().contiguous(),
        gate_up_packed.contiguous(), gate_up_scales.contiguous(), contiguous(gate_up_offsets),
        down_packed.contiguous(), down_scales.contiguous(), contiguous(down_offsets), out,
        format, group_size, torch.get_num_threads(),
    )
    return out


@moe_experts.register_fake
def _moe_experts_fake(hidden, *args):
    check_moe_experts_args(hidden, *args)
    return hidden.new_empty(hidden.shape)


# ---- Metal (shaders/moe.metal; buffers, params and launch geometry: shaders/moe.h) ------------------------

MOE_MAX_EXPERTS, MOE_ROUTE_THREADS, MOE_COMBINE_THREADS, MOE_THREADS = 1024, 256, 64, 128
MOE_GEMV_ROWS, MOE_GEMV_GATE_UP_FEATURES, MOE_GEMV_DOWN_FEATURES = 8, 2, 4
MOE_GEMM_BM, MOE_GEMM_BN = 32, 32
MoeParams = ParamsStruct("MoeParams", (
    ("uint", "tokens"), ("uint", "top_k"), ("uint", "experts"), ("uint", "hidden"), ("uint", "inter"),
    ("uint", "group_size"), ("uint", "rows_per_item")))


def moe_matmul_kernel(projection: str, format: str, asymmetric: bool, tokens: int) -> str:
    """``projection``: "gate_up" or "down". The GEMV path while no expert can get more than
    MOE_GEMV_ROWS rows (tokens <= MOE_GEMV_ROWS: decode), the tiled GEMM path above."""
    kind = "gemv" if tokens <= MOE_GEMV_ROWS else "gemm"
    return f"moe_{projection}_{kind}_{format}{'_asym' if asymmetric else ''}"


METAL_KERNELS = ("moe_route", "moe_combine", *(
    moe_matmul_kernel(projection, name, asymmetric, tokens)
    for projection in ("gate_up", "down")
    for name, fmt in GROUP_FORMATS.items()
    for asymmetric in ((False, True) if fmt.supports_asymmetric else (False,))
    for tokens in (1, MOE_GEMV_ROWS + 1)))


def moe_experts_launches(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                         gate_up_packed: torch.Tensor, gate_up_scales: torch.Tensor,
                         gate_up_offsets: torch.Tensor | None, down_packed: torch.Tensor, down_scales: torch.Tensor,
                         down_offsets: torch.Tensor | None, out: torch.Tensor, format: str,
                         group_size: int) -> list[Launch]:
    """``out [T, H] = moe_experts(...)`` on the GPU in four dispatches (route, gate_up + SwiGLU, down,
    combine). hidden, scales, offsets and out float16; top_k_index int32 and top_k_weights float32, both
    [T, top_k]; all contiguous, T * top_k >= 1. The intermediates are allocated here."""
    tokens, hidden_dim = hidden.shape
    top_k = top_k_index.shape[1]
    experts, two_inter = gate_up_packed.shape[:2]
    inter = two_inter // 2
    pairs = tokens * top_k
    gemv = tokens <= MOE_GEMV_ROWS
    rows_per_item = MOE_GEMV_ROWS if gemv else MOE_GEMM_BM
    max_items = pairs // rows_per_item + min(experts, pairs)  # >= sum over experts of ceil(rows / R)
    device = hidden.device

    def empty(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    sorted_pairs, pair_position = empty(pairs), empty(pairs)
    items, item_count = empty(max_items, 4), empty(1)  # uint4 work items, uint count
    act, expert_out = empty(pairs, inter, dtype=torch.float32), empty(pairs, hidden_dim, dtype=torch.float32)
    params = MoeParams.pack(tokens=tokens, top_k=top_k, experts=experts, hidden=hidden_dim, inter=inter,
                            group_size=group_size, rows_per_item=rows_per_item)

    def matmul(projection: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               offsets: torch.Tensor | None, y: torch.Tensor, features: int, gemv_features: int) -> Launch:
        per_threadgroup = gemv_features if gemv else MOE_GEMM_BN
        return Launch(moe_matmul_kernel(projection, format, offsets is not None, tokens),
                      (cdiv(features, per_threadgroup), max_items, 1), (MOE_THREADS, 1, 1),
                      {0: x, 1: packed, 2: scales, 3: x if offsets is None else offsets, 4: sorted_pairs, 5: items,
                       6: item_count, 7: y}, {8: params})

    return [
        Launch("moe_route", (1, 1, 1), (MOE_ROUTE_THREADS, 1, 1),
               {0: top_k_index, 1: sorted_pairs, 2: pair_position, 3: items, 4: item_count}, {5: params}),
        matmul("gate_up", hidden, gate_up_packed, gate_up_scales, gate_up_offsets, act, inter,
               MOE_GEMV_GATE_UP_FEATURES),
        matmul("down", act, down_packed, down_scales, down_offsets, expert_out, hidden_dim, MOE_GEMV_DOWN_FEATURES),
        Launch("moe_combine", (cdiv(hidden_dim, 4 * MOE_COMBINE_THREADS), tokens, 1), (MOE_COMBINE_THREADS, 1, 1),
               {0: expert_out, 1: pair_position, 2: top_k_weights, 3: out}, {4: params}),
    ]


def moe_experts_metal(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      gate_up_packed: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_offsets: torch.Tensor | None,
                      down_packed: torch.Tensor, down_scales: torch.Tensor, down_offsets: torch.Tensor | None,
                      format: str, group_size: int) -> torch.Tensor:
    """The MPS kernel (registered on macOS builds; device-agnostic apart from ``metal.dispatch``). The
    kernels take float16 activations: float32/bfloat16 hidden is converted, and the result back. Indices
    outside [0, E] are not checked (that would be a host sync): the router makes them."""
    args = (hidden, top_k_index, top_k_weights, gate_up_packed, gate_up_scales, gate_up_offsets, down_packed,
            down_scales, down_offsets, format, group_size)
    check_moe_experts_args(*args)
    if gate_up_packed.shape[0] > MOE_MAX_EXPERTS:
        return reference_moe_experts(*args)
    if not top_k_index.numel():
        return torch.zeros_like(hidden)
    half = torch.float16
    out = torch.empty(hidden.shape, dtype=half, device=hidden.device)  # moe_combine writes every element
    f16 = lambda t: None if t is None else metal.metal_input(t, half)  # noqa: E731
    metal.dispatch(moe_experts_launches(
        metal.metal_input(hidden, half), metal.metal_input(top_k_index, torch.int32),
        metal.metal_input(top_k_weights, torch.float32), metal.metal_input(gate_up_packed, torch.int32),
        f16(gate_up_scales), f16(gate_up_offsets), metal.metal_input(down_packed, torch.int32),
        f16(down_scales), f16(down_offsets), out, format, group_size))
    return out.to(hidden.dtype)


if _core.has_metal():
    moe_experts.register_kernel("mps")(moe_experts_metal)
