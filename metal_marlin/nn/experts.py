"""Quantized replacements of transformers' fused MoE experts (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``): ``QuantizedExperts`` (group formats, one stacked tensor per projection) and
``TrellisExperts`` (one trellis-coded matrix per expert and projection, so each may have its own bits).

``GroupedExperts.forward`` sorts the (token, slot) pairs by expert once and runs one matmul per active
expert on a contiguous slice: the Python loop is over experts, never over tokens. ``QuantizedExperts``
with a SiLU activation runs the whole layer as one op (``metal_marlin::moe_experts``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..formats import GroupQuantizedWeight
from ..ops import moe_experts, quant_matmul
from ..quant import quantize_trellis, quantize_weight
from .buffers import QuantizedWeightBuffers
from .trellis import TrellisLinear

PROJECTIONS = ("gate_up_proj", "down_proj")


def is_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``act_fn`` is SiLU: torch's function or module, or transformers' ``SiLUActivation``."""
    return (act_fn is torch.nn.functional.silu or isinstance(act_fn, nn.SiLU)
            or type(act_fn).__name__ == "SiLUActivation")


class GroupedExperts(nn.Module, ABC):
    """The grouped-by-expert MoE forward, with transformers' ``*Experts`` call signature:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    An index equal to ``num_experts`` marks a slot to ignore (transformers' convention). Subclasses
    say how one expert's ``gate_up_proj`` / ``down_proj`` is applied (``expert_linear``).
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], name: str = "") -> None:
        super().__init__()
        self.name = name
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn

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
        num_experts, two_i, hidden = gate_up_proj.shape
        super().__init__(num_experts, hidden, two_i // 2, act_fn, name)
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)

    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, getattr(self, projection)[expert].to(x.dtype))


class QuantizedExperts(GroupedExperts):
    """Fused MoE experts with group-quantized weights: with a SiLU activation the forward is one
    ``moe_experts`` op, otherwise one quantized matmul per active expert."""

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
        super().__init__(num_experts, hidden_dim, intermediate_dim, act_fn, name)
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

    @classmethod
    def from_quantized(cls, gate_up_proj: GroupQuantizedWeight, down_proj: GroupQuantizedWeight,
                       act_fn: Callable[[torch.Tensor], torch.Tensor], group_size: int,
                       name: str = "") -> QuantizedExperts:
        """Wrap stacked quantized weights ``[E, 2I, H]`` and ``[E, H, I]`` (e.g. from per-expert GPTQ);
        ``group_size`` is the setting they were made with (``-1``: per channel)."""
        num_experts, two_i, hidden = gate_up_proj.shape
        mod = cls(num_experts, hidden, two_i // 2, act_fn, gate_up_proj.format.name, group_size,
                  gate_up_proj.symmetric, gate_up_proj.packed.device, name)
        mod.gate_up_proj.load_quantized(gate_up_proj)
        mod.down_proj.load_quantized(down_proj)
        return mod

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not is_silu(self.act_fn):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        gate_up, down = self.gate_up_proj, self.down_proj
        # Each projection's group size is resolved against its own K (per-channel: K); the larger one
        # describes both, as a group size >= K is one group per row.
        return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up.packed, gate_up.scales,
                           gate_up.offsets, down.packed, down.scales, down.offsets, gate_up.format,
                           max(gate_up.group_size, down.group_size))

    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        part: QuantizedWeightBuffers = getattr(self, projection)
        offsets = None if part.offsets is None else part.offsets[expert]
        return quant_matmul(x, part.packed[expert], part.scales[expert], offsets, None, part.format,
                            part.group_size)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, {self.gate_up_proj.format_repr()}")


def expert_bits(bits: int | Mapping[str, Sequence[int]], num_experts: int, name: str) -> dict[str, list[int]]:
    """``{projection: [bits per expert]}`` from one width or a per-expert mapping, checked."""
    if isinstance(bits, int):
        return {p: [bits] * num_experts for p in PROJECTIONS}
    if set(bits) != set(PROJECTIONS):
        raise ValueError(f"{name}: per-expert bits need exactly the keys {PROJECTIONS}, got {sorted(bits)}")
    for projection in PROJECTIONS:
        if len(bits[projection]) != num_experts:
            raise ValueError(f"{name}.{projection}: {len(bits[projection])} bit widths for {num_experts} experts")
    return {p: [int(k) for k in bits[p]] for p in PROJECTIONS}


class TrellisExperts(GroupedExperts):
    """Fused MoE experts with trellis-coded weights: ``gate_up_proj[e]`` and ``down_proj[e]`` are
    ``TrellisLinear`` modules, each with its own bit width (``bits[projection][e]``)."""

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        bits: Mapping[str, Sequence[int]],
        codebook: str = "3inst",
        had: Mapping[str, tuple[int, int]] | None = None,
        device: torch.device | str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(num_experts, hidden_dim, intermediate_dim, act_fn, name)
        self.codebook = codebook
        shapes = {"gate_up_proj": (hidden_dim, 2 * intermediate_dim), "down_proj": (intermediate_dim, hidden_dim)}
        for projection, widths in expert_bits(bits, num_experts, name).items():
            had_in, had_out = (had or {}).get(projection, (128, 128))
            in_features, out_features = shapes[projection]
            setattr(self, projection, nn.ModuleList(
                TrellisLinear(in_features, out_features, bias=False, bits=k, codebook=codebook, had_in=had_in,
                              had_out=had_out, device=device, name=f"{name}.{projection}.{e}")
                for e, k in enumerate(widths)))

    @classmethod
    def from_float(
        cls,
        experts: nn.Module,
        bits: int | Mapping[str, Sequence[int]] = 4,
        codebook: str = "3inst",
        hessians: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
        name: str = "",
    ) -> TrellisExperts:
        """Trellis-code a transformers experts module, expert by expert. ``bits`` is one width for all or
        ``{projection: [bits per expert]}``; ``hessians`` (optional) gives each expert's input Hessian
        (``None`` for an expert that calibration never reached: it is coded without LDLQ)."""
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        bits = expert_bits(bits, num_experts, name)
        coded = {p: [quantize_trellis(getattr(experts, p)[e], bits=bits[p][e], codebook=codebook,
                                      hessian=None if hessians is None else hessians[p][e],
                                      name=f"{name}.{p}.{e}")
                     for e in range(num_experts)] for p in PROJECTIONS}
        had = {p: (coded[p][0].had_in, coded[p][0].had_out) for p in PROJECTIONS}
        mod = cls(num_experts, hidden, two_i // 2, experts.act_fn, bits, codebook, had,
                  experts.gate_up_proj.device, name)
        for p in PROJECTIONS:
            for e, tw in enumerate(coded[p]):
                getattr(mod, p)[e].load_quantized(tw)
        return mod

    @property
    def bits(self) -> dict[str, list[int]]:
        return {p: [m.bits for m in getattr(self, p)] for p in PROJECTIONS}

    @property
    def hadamard_blocks(self) -> dict[str, tuple[int, int]]:
        return {p: (getattr(self, p)[0].had_in, getattr(self, p)[0].had_out) for p in PROJECTIONS}

    def expert_linear(self, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, projection)[expert](x)

    def dequantize_weight(self, projection: str) -> torch.Tensor:
        """The dense float32 ``[E, N, K]`` weight of one projection."""
        return torch.stack([m.dequantize_weight() for m in getattr(self, projection)])

    def extra_repr(self) -> str:
        mean_bits = {p: sum(b) / len(b) for p, b in self.bits.items()}
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, format=trellis, codebook={self.codebook}, "
                f"mean bits gate_up={mean_bits['gate_up_proj']:.2f} down={mean_bits['down_proj']:.2f}")
