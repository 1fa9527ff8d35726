"""How much the loss feels each weight matrix: the sensitivity ``--bpw`` allocates bits by.

A weight error ``dW`` in ``y = W x`` moves the loss by about ``1/2 E[dy^T F dy]`` with ``dy = dW x`` and
``F`` the Fisher information of the loss in ``y``. Taking ``F`` diagonal, ``E[g g^T]`` with ``g = dL/dy``
per token, and ``dW`` i.i.d. with variance ``s^2`` (what incoherence processing and trellis coding give),
the expected loss increase is ``s^2 / 2 * E_t[||x_t||^2 ||g_t||^2]``. That expectation is a matrix's
sensitivity. Unlike the input energy ``E||x||^2`` alone, it weighs an error by how much it reaches the
loss, so a matrix whose output the rest of the network damps (or amplifies) is priced accordingly.

For a fused expert the expectation runs over the tokens routed to it, with ``g`` the gradient at that
expert's own output (its routing weight times the gradient at the MoE output), and ``g`` at
``gate_up_proj``'s output is back-propagated through that expert's activation and ``down_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..nn.experts import PROJECTIONS

RoutedTokens = list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]


def routed_tokens(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[int, RoutedTokens]:
    """The tokens a fused experts module's call routes to each expert: the number of tokens in the call
    and, per expert that got any, ``(e, rows, x, w)``: its tokens' rows in the flattened call, their
    hidden states ``[rows, hidden]`` and routing weights ``[rows, 1]`` (detached, float32)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    hidden, index, weights = (*args, *(kwargs[n] for n in names[len(args):]))
    hidden = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    index = index.reshape(hidden.shape[0], -1)
    weights = weights.detach().reshape(index.shape).float()
    routed = []
    for e in torch.unique(index).tolist():
        if e >= experts.gate_up_proj.shape[0]:
            continue  # transformers' ignore index
        rows, slots = (index == e).nonzero(as_tuple=True)
        routed.append((e, rows, hidden[rows], weights[rows, slots].unsqueeze(-1)))
    return hidden.shape[0], routed


class _LinearSensitivity:
    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x_energy = args[0].detach().double().square().sum(-1).reshape(-1)
        self.tokens += x_energy.numel()

        def on_grad(grad: torch.Tensor) -> None:
            self.total += (x_energy * grad.detach().double().square().sum(-1).reshape(-1)).sum().item()

        output.register_hook(on_grad)

    def value(self) -> float:
        return self.total / max(self.tokens, 1)


class _ExpertSensitivity:
    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.total = {p: torch.zeros(experts.gate_up_proj.shape[0], dtype=torch.float64) for p in PROJECTIONS}
        self.tokens = 0

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        tokens, routed = routed_tokens(module, args, kwargs)
        self.tokens += tokens

        def on_grad(grad: torch.Tensor) -> None:
            grad = grad.detach().reshape(-1, grad.shape[-1]).float()
            with torch.enable_grad():
                for e, rows, x, w in routed:
                    z = (x @ self.experts.gate_up_proj[e].detach().float().T).requires_grad_()
                    gate, up = z.chunk(2, dim=-1)
                    inner = self.experts.act_fn(gate) * up
                    y = inner @ self.experts.down_proj[e].detach().float().T
                    grad_y = w * grad[rows]
                    (grad_z,) = torch.autograd.grad(y, z, grad_y)
                    for p, inputs, g in (("gate_up_proj", x, grad_z), ("down_proj", inner.detach(), grad_y)):
                        self.total[p][e] += (inputs.double().square().sum(-1) * g.double().square().sum(-1)).sum()

        output.register_hook(on_grad)

    def value(self, projection: str) -> list[float]:
        return (self.total[projection] / max(self.tokens, 1)).tolist()


def measure_sensitivity(model: nn.Module, linears: Mapping[str, nn.Linear], experts: Mapping[str, nn.Module],
                        batches: torch.Tensor) -> tuple[dict[str, float], dict[str, dict[str, list[float]]]]:
    """``E_t[||x_t||^2 ||dL/dy_t||^2]`` per linear module and, for fused experts, per projection and expert,
    with ``L`` the next-token cross-entropy of a transformers causal LM on ``batches`` (``[n, seq]`` ids).

    One forward and backward per sequence; only activation gradients are computed, never weight ones."""
    linear_stats = {n: _LinearSensitivity() for n in linears}
    expert_stats = {n: _ExpertSensitivity(m) for n, m in experts.items()}
    embedded: list[torch.Tensor] = []

    def track_embeddings(module, args, output):
        output = output.detach().requires_grad_()  # the graph starts here whether or not weights need grad
        embedded.append(output)
        return output

    handles = [model.get_input_embeddings().register_forward_hook(track_embeddings)]
    handles += [m.register_forward_hook(linear_stats[n].hook) for n, m in linears.items()]
    handles += [m.register_forward_hook(expert_stats[n].hook, with_kwargs=True) for n, m in experts.items()]
    try:
        for row in batches:
            embedded.clear()
            with torch.enable_grad():
                ids = row.unsqueeze(0)
                loss = model(ids, labels=ids, use_cache=False).loss
                torch.autograd.grad(loss, embedded)
    finally:
        for h in handles:
            h.remove()
    return ({n: s.value() for n, s in linear_stats.items()},
            {n: {p: s.value(p) for p in PROJECTIONS} for n, s in expert_stats.items()})
