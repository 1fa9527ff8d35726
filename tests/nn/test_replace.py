"""replace_linear_layers on tiny transformers models: Llama, Qwen3, Qwen3-MoE, GLM-4.7-Flash (MLA + MoE).

Oracle: the same transformers model with every replaced weight set to its dequantized value, run by
transformers' own code with plain float32 nn.Linear / experts math.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CONFIGS, build_model

from metal_marlin import MetalQuantizedLinear, QuantizedExperts, _core, replace_linear_layers
from metal_marlin.nn import TrellisExperts, TrellisLinear, dequantize_model, quantized_submodules, replace_module

ARCHS = list(CONFIGS)


def dequantized_twin(original: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``original`` whose replaced weights hold the dequantized values of ``quantized``."""
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for name, mod in quantized_submodules(quantized):
            if isinstance(mod, (MetalQuantizedLinear, TrellisLinear)):
                twin.get_submodule(name).weight.copy_(mod.dequantize_weight())
            elif isinstance(mod, QuantizedExperts):
                target = twin.get_submodule(name)
                target.gate_up_proj.copy_(mod.gate_up_proj.dequantize_weight())
                target.down_proj.copy_(mod.down_proj.dequantize_weight())
            else:
                target = twin.get_submodule(name)
                target.gate_up_proj.copy_(mod.dequantize_weight("gate_up_proj"))
                target.down_proj.copy_(mod.dequantize_weight("down_proj"))
    return twin


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("fmt", "group_size"), [("int4", 32), ("int8", -1), ("fp4", 32), ("int3", 32)])
def test_logits_equal_dequantized_model(arch, fmt, group_size, token_ids):
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    summary = replace_linear_layers(quantized, format=fmt, group_size=group_size)
    twin = dequantized_twin(original, quantized)
    with torch.no_grad():
        got = quantized(token_ids).logits
        want = twin(token_ids).logits
    assert torch.isfinite(got).all()
    # int4/int8 on the integer paths (avx512_vnni, avx512_amx): activations rounded to 16-bit fixed point
    # per 32-block in every matmul (docs/kernels.md), a few 1e-4 on these logits after two layers.
    integer = fmt in ("int4", "int8") and _core.simd_level() in ("avx512_vnni", "avx512_amx")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-4 if integer else 1e-4)
    assert "lm_head" in summary.kept_dense and "lm_head" not in summary.replaced
    assert summary.bytes_after < summary.bytes_before


def pin_routing(source: torch.nn.Module, target: torch.nn.Module, token_ids: torch.Tensor) -> None:
    """Make ``target``'s MoE routers return the decisions ``source``'s routers take on ``token_ids``.

    Top-k routing is discontinuous: a 0.5% weight error can flip a near-tied expert choice, which
    says nothing about the precision of the quantized matmuls this comparison is about.
    """
    decisions = {}
    routers = [n for n, m in source.named_modules() if n.endswith("mlp.gate") and not hasattr(m, "in_features")]
    handles = [source.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: decisions.__setitem__(n, out)) for n in routers]
    with torch.no_grad():
        source(token_ids)
    for h in handles:
        h.remove()
    for n in routers:
        target.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: decisions[n])


# Measured: int8 g32 gives 0.5% relative weight error and 0.7-1.7% logit error, int4 g32 7.6% and
# 11-24% (random 2-layer models amplify errors: random attention is sharper than trained attention).
@pytest.mark.parametrize("arch", ARCHS)
# Top-1 agreement is checked at int8 only: a random model's logits are too flat for it to mean
# anything at int4.
@pytest.mark.parametrize(("fmt", "group_size", "bound", "min_top1"),
                         [("int8", 32, 0.03, 0.95), ("int4", 32, 0.35, None)])
def test_close_to_original_model(arch, fmt, group_size, bound, min_top1, token_ids):
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format=fmt, group_size=group_size)
    pin_routing(original, quantized, token_ids)
    with torch.no_grad():
        got, want = quantized(token_ids).logits, original(token_ids).logits
    err = relative_error(got, want)
    top1 = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    assert err < bound, f"{arch} {fmt} g{group_size}: relative logit error {err:.4f}"
    assert min_top1 is None or top1 >= min_top1, f"{arch} {fmt} g{group_size}: top-1 agreement {top1:.3f}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe_lite"])
def test_moe_experts_are_replaced(arch):
    model = build_model(arch)
    summary = replace_linear_layers(model, format="int4", group_size=32)
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    assert experts and set(experts) <= set(summary.replaced)
    assert not any(p.dim() == 3 for p in model.parameters()), "a dense 3-D expert weight survived"


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_dequantized_model(arch, token_ids):
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format="int4", group_size=32)
    twin = dequantized_twin(original, quantized)
    prompt = token_ids[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(quantized.generate(prompt, **kwargs), twin.generate(prompt, **kwargs))


def test_skip_and_layer_config():
    model = build_model("llama")
    summary = replace_linear_layers(
        model, format="int4", group_size=32,
        skip=[r"lm_head", r"\.o_proj$"],
        layer_config={r"layers\.0\.mlp\.down_proj": {"format": "int8", "group_size": -1},
                      r"layers\.1\.mlp\.up_proj": None},
    )
    assert isinstance(model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[1].mlp.up_proj, torch.nn.Linear)
    down = model.model.layers[0].mlp.down_proj
    assert (down.format, down.group_size) == ("int8", 160)
    assert model.model.layers[1].mlp.down_proj.format == "int4"
    assert "model.layers.1.mlp.up_proj" in summary.kept_dense
    assert len(summary.replaced) == 2 * 7 - 2 - 1


@pytest.mark.parametrize(("group_size", "match"), [
    (48, r"model\.layers\.0\.self_attn\.q_proj: group_size=48 is not supported"),
    (32, r"model\.layers\.1\.mlp\.odd: in_features K=100 is not divisible by the 32-weight packing block"),
])
def test_bad_group_size_names_layer_and_leaves_model_untouched(group_size, match):
    model = build_model("llama")
    model.model.layers[1].mlp.odd = torch.nn.Linear(100, 8)  # visited by the rewriter, unused by forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        replace_linear_layers(model, format="int4", group_size=group_size)
    assert not any(isinstance(m, MetalQuantizedLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_group_size_larger_than_some_rows_uses_a_short_last_group(token_ids):
    # hidden 96 with group 64: groups of 64 + 32 along K (docs/formats.md)
    original = build_model("llama")
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format="int4", group_size=64)
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert q_proj.scales.shape == (96, 2)
    with torch.no_grad():
        torch.testing.assert_close(quantized(token_ids).logits, dequantized_twin(original, quantized)(token_ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(format="int5"), "unknown format 'int5'"),
    (dict(format="fp4", symmetric=False), "fp4 has no asymmetric"),
    (dict(layer_config={"q_proj": {"bitz": 4}}), r"unknown keys \['bitz'\]"),
    (dict(scale_method="best"), "unknown scale_method"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    model = build_model("llama")
    with pytest.raises(ValueError, match=match):
        replace_linear_layers(model, **{"group_size": 32, **kwargs})


def test_state_dict_round_trip_and_repr(token_ids):
    model = build_model("qwen3_moe")
    replace_linear_layers(model, format="int4", group_size=32)
    fresh = build_model("qwen3_moe", seed=5)
    replace_linear_layers(fresh, format="int4", group_size=32)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(token_ids).logits, model(token_ids).logits)
    text = repr(model.model.layers[0].self_attn.q_proj)
    assert "format=int4" in text and "group_size=32" in text and "5.000 bits/weight" in text


def test_activation_dtypes(token_ids):
    layer = torch.nn.Linear(96, 40)
    q = MetalQuantizedLinear.from_float(layer, "int4", group_size=32)
    x = torch.randn(4, 96)
    want = x.double() @ q.dequantize_weight().double().T + layer.bias.double()
    # float32: 1e-4 covers the 16-bit activation rounding of the avx512_vnni int4 GEMV (docs/kernels.md).
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        got = q(x.to(dtype))
        assert got.dtype == dtype
        assert relative_error(got, want) < tol


def test_forward_error_names_layer():
    model = build_model("llama")
    replace_linear_layers(model, format="int4", group_size=32)
    layer = model.model.layers[1].mlp.down_proj
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.down_proj: .*float32, float16 or bfloat16"):
        layer(torch.ones(2, 160, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: .*K=100"):
        layer(torch.ones(2, 100))


@pytest.mark.parametrize("arch", ARCHS)
def test_trellis_logits_equal_dequantized_model(arch, token_ids):
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format="trellis", bits=3, layer_config={r"experts$": {"format": "int4"}},
                          group_size=32)
    assert isinstance(quantized.model.layers[0].self_attn.o_proj, TrellisLinear)
    with torch.no_grad():
        torch.testing.assert_close(quantized(token_ids).logits, dequantized_twin(original, quantized)(token_ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm4_moe_lite"])
def test_trellis_experts_with_per_expert_bits(arch, token_ids):
    """Fused experts trellis-coded expert by expert, each projection and expert with its own bit width."""
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format="trellis", bits=3)
    name = next(n for n, m in quantized.named_modules() if isinstance(m, TrellisExperts))
    experts = original.get_submodule(name)
    count = experts.gate_up_proj.shape[0]
    bits = {"gate_up_proj": [2 + e % 3 for e in range(count)], "down_proj": [4 - e % 3 for e in range(count)]}
    mixed = TrellisExperts.from_float(experts, bits=bits, codebook="mcg", name=name)
    assert mixed.bits == bits
    assert [m.bits for m in mixed.down_proj] == bits["down_proj"]
    replace_module(quantized, name, mixed)
    with torch.no_grad():
        torch.testing.assert_close(quantized(token_ids).logits, dequantized_twin(original, quantized)(token_ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # dequantize_model restores dense experts carrying exactly the dequantized values
    restored = copy.deepcopy(quantized)
    dequantize_model(restored)
    assert not list(quantized_submodules(restored))
    assert torch.equal(restored.get_submodule(name).down_proj, mixed.dequantize_weight("down_proj"))


def test_trellis_experts_bad_bits_named():
    experts = build_model("qwen3_moe").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"layer0\.experts\.down_proj: 3 bit widths for 8 experts"):
        TrellisExperts.from_float(experts, bits={"gate_up_proj": [2] * 8, "down_proj": [2] * 3},
                                  name="layer0.experts")
