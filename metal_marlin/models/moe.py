"""The MoE block: a router choosing top-k experts per token, the experts (any ``GroupedExperts``: dense,
group-quantized through the experts op, or trellis), and optional shared experts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import DenseExperts
from .layers import SwiGLUMLP


class SoftmaxRouter(nn.Module):
    """Qwen-MoE routing: softmax over the router logits, top-k, optionally renormalised."""

    def __init__(self, num_experts: int, hidden: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights.to(logits.dtype)


class SigmoidGroupRouter(nn.Module):
    """DeepSeek-V3 / GLM-4.7-Flash routing: sigmoid scores; experts chosen by score plus
    ``e_score_correction_bias`` within the ``topk_group`` best of ``n_group`` groups (a group's score is
    the sum of its two best); the chosen experts' plain scores, normalised if ``norm_topk_prob``, times
    ``routed_scaling_factor`` are the weights. Computed in float32."""

    def __init__(self, num_experts: int, hidden: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            groups = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.n_group, dim=1), -torch.inf)
        index = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, index)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return index, weights * self.routed_scaling_factor


class MoEBlock(nn.Module):
    """``experts(x, router(x)) + shared_experts(x)``; module names follow transformers (``gate``,
    ``experts``, ``shared_experts``)."""

    def __init__(self, gate: nn.Module, num_experts: int, hidden: int, intermediate: int, act_fn,
                 shared_intermediate: int | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = DenseExperts(torch.empty(num_experts, 2 * intermediate, hidden),
                                    torch.empty(num_experts, hidden, intermediate), act_fn)
        self.shared_experts = (SwiGLUMLP(hidden, shared_intermediate, act_fn) if shared_intermediate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        index, weights = self.gate(flat)
        out = self.experts(flat, index, weights).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
