"""``QuantizedExperts``: transformers' fused MoE experts (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) with group-quantized weights.

The forward sorts the (token, slot) pairs by expert once and runs one matmul per active expert on a
contiguous slice: the Python loop is over experts, never over tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from ..ops import quant_matmul
from ..quant import quantize_weight
from .buffers import QuantizedWeightBuffers


class GroupedExperts(nn.Module, ABC):
    """The grouped-by-expert MoE forward, with transformers' ``*Experts`` call signature:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    An index equal to ``num_experts`` marks a slot to ignore (transformers' convention). Subclasses
    say how one expert's ``gate_up_proj`` / ``down_proj`` is applied (``expert_linear``).
    """

    num_experts: int
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    name: str = ""

    @abstractmethod
    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W[expert].T`` for ``projection`` in ("gate_up_proj", "down_proj")."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_slot = order // top_k
        # One host sync per layer: the per-expert slice bounds.
        counts = torch.bincount(flat_experts, minlength=self.num_experts + 1).tolist()
        if len(counts) > self.num_experts + 1:
            raise ValueError(f"{self.name}: expert index out of range (num_experts={self.num_experts})")
        x_sorted = hidden_states[token_of_slot]
        out_sorted = torch.zeros_like(x_sorted)
        start = 0
        for expert, count in enumerate(counts[: self.num_experts]):
            if count == 0:
                continue
            end = start + count
            gate, up = self.expert_linear("gate_up_proj", expert, x_sorted[start:end]).chunk(2, dim=-1)
            out_sorted[start:end] = self.expert_linear("down_proj", expert, self.act_fn(gate) * up)
            start = end
        # Slots routed to the ignore index (sorted last) keep zeros.
        out_sorted = out_sorted * top_k_weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token_of_slot, out_sorted.to(hidden_states.dtype))


class DenseExperts(GroupedExperts):
    """Dense float experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` parameters), e.g. a
    dequantized ``QuantizedExperts``; ``replace_linear_layers`` can quantize it again."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], name: str = "") -> None:
        super().__init__()
        self.name = name
        self.num_experts = gate_up_proj.shape[0]
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.act_fn = act_fn

    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, getattr(self, projection)[expert].to(x.dtype))


class QuantizedExperts(GroupedExperts):
    """Fused MoE experts with group-quantized weights; one quantized matmul per active expert."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        format: str = "int4",
        group_size: int = 128,
        symmetric: bool | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.name = name
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        self.gate_up_proj = QuantizedWeightBuffers((num_experts, 2 * intermediate_dim, hidden_dim), format,
                                                   group_size, symmetric, device, f"{name}.gate_up_proj")
        self.down_proj = QuantizedWeightBuffers((num_experts, hidden_dim, intermediate_dim), format,
                                                group_size, symmetric, device, f"{name}.down_proj")

    @classmethod
    def from_float(
        cls,
        experts: nn.Module,
        format: str = "int4",
        group_size: int = 128,
        symmetric: bool | None = None,
        scale_method: str = "mse",
        name: str = "",
    ) -> QuantizedExperts:
        """Quantize a transformers experts module holding 3-D ``gate_up_proj`` and ``down_proj``."""
        gate_up, down = experts.gate_up_proj, experts.down_proj
        num_experts, two_i, hidden = gate_up.shape
        mod = cls(num_experts, hidden, two_i // 2, experts.act_fn, format, group_size, symmetric,
                  gate_up.device, name)
        for part, w in ((mod.gate_up_proj, gate_up), (mod.down_proj, down)):
            part.load_quantized(quantize_weight(w, format, group_size=group_size, symmetric=symmetric,
                                                scale_method=scale_method, name=part.name))
        return mod

    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        part: QuantizedWeightBuffers = getattr(self, projection)
        offsets = None if part.offsets is None else part.offsets[expert]
        return quant_matmul(x, part.packed[expert], part.scales[expert], offsets, None, part.format,
                            part.group_size)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, {self.gate_up_proj.format_repr()}")
