"""--bpw allocation: the budget holds, the greedy walk is optimal, and the pipeline honours it."""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import pytest
import torch

from metal_marlin.nn import TrellisLinear
from metal_marlin.quant.allocation import TensorCost, allocate_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import SETTINGS, TEXT, CharTokenizer, build_model  # noqa: E402


def costs():
    return [TensorCost("a", 64, 64, 1.0, 50.0), TensorCost("b", 32, 128, 0.2, 5.0),
            TensorCost("c", 128, 32, 3.0, 1.0), TensorCost("d", 16, 256, 0.5, 400.0)]


def stored_bits(tensors, bits):
    return sum(t.params * bits[t.name] + t.overhead_bits() for t in tensors)


@pytest.mark.parametrize("bpw", [2.6, 3.0, 3.5, 4.25])
def test_budget_and_optimality(bpw):
    tensors = costs()
    bits = allocate_bits(tensors, bpw, min_bits=1, max_bits=6)
    total = sum(t.params for t in tensors)
    assert stored_bits(tensors, bits) <= bpw * total
    best = min((c for c in itertools.product(range(1, 7), repeat=len(tensors))
                if stored_bits(tensors, dict(zip("abcd", c, strict=True))) <= bpw * total),
               key=lambda c: sum(t.proxy(k) for t, k in zip(tensors, c, strict=True)))
    greedy = sum(t.proxy(bits[t.name]) for t in tensors)
    optimum = sum(t.proxy(k) for t, k in zip(tensors, best, strict=True))
    # equal-size steps make greedy exact here; with unequal sizes it may leave a small budget slack
    assert greedy <= optimum * 1.25


def test_budget_below_minimum():
    with pytest.raises(ValueError, match="below the minimum of"):
        allocate_bits(costs(), 0.9)


def test_pipeline_bpw_mixes_bits_within_budget():
    from metal_marlin.models.quantize import quantize_model

    model = copy.deepcopy(build_model("llama"))
    quantize_model(model, CharTokenizer(), format="trellis", calibration_text=TEXT, calibration=SETTINGS, bpw=2.5)
    layers = [m for m in model.modules() if isinstance(m, TrellisLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    stored = sum(m.quantized_weight.nbytes * 8 for m in layers)
    assert stored / weights <= 2.5 + 1e-9
    assert len({m.bits for m in layers}) > 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_moe_bits_follow_routing_and_protect_attention():
    """GLM-4.7-Flash-style MoE: an expert the router never picks gets the floor of 2 bits; the others'
    gate_up bits rise with their routed input energy sum(w^2 ||x||^2) (w: routing weight, measured here
    by the test's own hook) times mean(W^2); attention and the shared expert keep ceil(bpw) + 1 bits."""
    from metal_marlin.models.quantize import quantize_model
    from metal_marlin.nn import TrellisExperts

    model = copy.deepcopy(build_model("glm4_moe_lite"))
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        router.e_score_correction_bias[0] = -100.0  # selection adds the bias: expert 0 is never chosen
    original = model.model.layers[1].mlp.experts
    energy = torch.zeros(8, dtype=torch.float64)

    def record(module, args):
        hidden, index, weights = args
        for e in range(8):
            rows, slots = (index == e).nonzero(as_tuple=True)
            energy[e] += (weights[rows, slots].double() ** 2 * hidden[rows].double().square().sum(-1)).sum()

    handle = original.register_forward_pre_hook(record)
    quantize_model(model, CharTokenizer(), format="trellis", calibration_text=TEXT, calibration=SETTINGS, bpw=3.5)
    handle.remove()
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, TrellisExperts)
    assert experts.bits["gate_up_proj"][0] == 2 and experts.bits["down_proj"][0] == 2
    sensitivity = energy * original.gate_up_proj.detach().double().square().mean(dim=(1, 2))
    ranked = [experts.bits["gate_up_proj"][e] for e in sensitivity.argsort().tolist()]
    assert ranked == sorted(ranked) and ranked[-1] > 2
    protected = [m for n, m in model.named_modules() if isinstance(m, TrellisLinear)
                 and ("self_attn" in n or "shared_experts" in n)]
    assert protected and all(m.bits >= 5 for m in protected)
    coded = [m for m in model.modules() if isinstance(m, TrellisLinear)]  # includes every expert's matrices
    weights = sum(m.in_features * m.out_features for m in coded)
    assert sum(m.quantized_weight.nbytes * 8 for m in coded) / weights <= 3.5 + 1e-9
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
