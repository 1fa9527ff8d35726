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
from ..formats import GroupQuantizedWeight, get_format
from .group_matmul import ACTIVATION_DTYPES, check_quant_matmul_args


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
