"""The fused C++ decode step (``_core.DecoderStack``, models/fused_decode.py) against the Python blocks it
replaces (themselves tested against transformers in test_runtime.py) and against transformers directly:
logits, KV-cache contents and greedy tokens, on tiny llama / qwen2 (q/k/v bias) / qwen3 (q/k norm) models,
with mixed formats per projection, left-padded batches, and on every CPU kernel path."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest
import torch

import metal_marlin.models.causal_lm as causal_lm
from metal_marlin import MetalQuantizedLinear, TrellisForCausalLM, _core, replace_linear_layers
from metal_marlin.models.fused_decode import build_decoder_stack, unsupported_reason

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from test_quant_matmul import INTEGER_LEVELS, SIMD_LEVELS  # noqa: E402
from test_replace import dequantized_twin  # noqa: E402
from tiny_models import build_model  # noqa: E402

# Both paths run the same GEMV kernels; only RMSNorm, RoPE, SiLU and attention round differently. On the
# avx512_vnni path such a difference can move an activation across a 16-bit rounding step of the integer
# GEMV, so the paths then agree only as well as each agrees with transformers' float model (twice the
# oracle tolerance, by the triangle inequality).
ORACLE_TOL = dict(rtol=0, atol=3e-4)
VNNI_PATH_TOL = dict(rtol=0, atol=6e-4)
FLOAT_PATH_TOL = dict(rtol=0, atol=2e-5)
# Mixed formats in one layer: q/k/v (and gate/up) then read the same input prepared twice or three times.
MIXED = {r"self_attn\.k_proj": {"format": "int8"},
         r"self_attn\.v_proj": {"format": "fp4", "group_size": 64, "symmetric": True},
         r"mlp\.up_proj": {"format": "int3", "group_size": 32}, r"mlp\.down_proj": {"format": "int8"}}


# Trellis projections beside group-quantized ones (gate trellis, up int4: their row ranges must line up).
TRELLIS_MIX = {r"self_attn\.(q|v)_proj": {"format": "trellis", "bits": 3},
               r"mlp\.gate_proj": {"format": "trellis", "bits": 4}, r"mlp\.down_proj": {"format": "trellis", "bits": 2}}


def quantized_pair(arch: str, layer_config=None):
    """(transformers model with dequantized weights, our runtime on the quantized weights)."""
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format="int4", group_size=32, symmetric=False, layer_config=layer_config)
    return dequantized_twin(original, quantized), TrellisForCausalLM.from_hf_model(quantized)


def decode_steps(model, ids: torch.Tensor, mask: torch.Tensor, prefix: int, fused: bool, monkeypatch):
    """Logits of a prefill of ``prefix`` tokens then one token per step, and the cache."""
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(causal_lm, "runs_fused", lambda *args: False)
        with torch.inference_mode():
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            logits = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache)]
            for i in range(prefix, ids.shape[1]):
                logits.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache))
                if fused:
                    assert model._decoder_stack[1] is not None, "the step did not run fused"
    return torch.cat(logits, dim=1), cache


@pytest.fixture(params=SIMD_LEVELS)
def simd_level(request):
    previous = _core.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        _core.set_simd_level(previous)


@pytest.mark.parametrize("layer_config", [None, MIXED, TRELLIS_MIX], ids=["int4", "mixed", "trellis"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_steps_match_python_blocks_and_transformers(arch, layer_config, simd_level, monkeypatch):
    torch.set_num_threads(2)
    oracle, ours = quantized_pair(arch, layer_config)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded: the fused attention must skip its padding keys
    ids[1, :3] = 0
    fused, fused_cache = decode_steps(ours, ids, mask, 4, True, monkeypatch)
    python, python_cache = decode_steps(ours, ids, mask, 4, False, monkeypatch)
    real = mask.bool()
    tol = VNNI_PATH_TOL if simd_level in INTEGER_LEVELS else FLOAT_PATH_TOL
    torch.testing.assert_close(fused[real], python[real], **tol)
    torch.testing.assert_close(fused_cache.keys, python_cache.keys, **tol)
    torch.testing.assert_close(fused_cache.values, python_cache.values, **tol)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = oracle(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(fused[real], want[real], **ORACLE_TOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_greedy_generation_is_the_same_on_both_paths(threads, monkeypatch):
    torch.set_num_threads(threads)
    _, ours = quantized_pair("llama")
    ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(9))
    fused = ours.generate(ids, max_new_tokens=20, stop_token_ids=[])
    monkeypatch.setattr(causal_lm, "runs_fused", lambda *args: False)
    assert torch.equal(ours.generate(ids, max_new_tokens=20, stop_token_ids=[]), fused)


def test_unsupported_models_take_the_python_blocks():
    dense = TrellisForCausalLM.from_hf_model(build_model("llama"))
    assert "model.layers.0.self_attn.q_proj is Linear, not MetalQuantizedLinear or TrellisLinear" in (
        unsupported_reason(dense))
    ids = torch.randint(0, 320, (1, 5))
    dense.generate(ids, max_new_tokens=2)
    assert dense._decoder_stack[1] is None
    with pytest.raises(ValueError, match="q_proj is Linear"):
        build_decoder_stack(dense)
    _, moe = quantized_pair("qwen3_moe")
    assert "not GQA attention + SwiGLU MLP" in unsupported_reason(moe)
    _, mla = quantized_pair("glm4_moe_lite")
    assert "attention is not GQA" in unsupported_reason(mla)


def test_modules_replaced_between_generations_are_picked_up(monkeypatch):
    _, ours = quantized_pair("llama")
    ids = torch.randint(0, 320, (1, 5), generator=torch.Generator().manual_seed(1))
    ours.generate(ids, max_new_tokens=3)
    first_stack = ours._decoder_stack[1]
    mlp = ours.model.layers[0].mlp
    doubled = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features, bias=False)
    with torch.no_grad():
        doubled.weight.copy_(2 * mlp.down_proj.dequantize_weight())
    mlp.down_proj = MetalQuantizedLinear.from_float(doubled, "int8", group_size=32)
    fused = ours.generate(ids, max_new_tokens=12, stop_token_ids=[])
    assert ours._decoder_stack[1] is not first_stack
    monkeypatch.setattr(causal_lm, "runs_fused", lambda *args: False)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, stop_token_ids=[]), fused)


def test_decoder_stack_rejects_bad_input():
    _, ours = quantized_pair("llama")
    stack = build_decoder_stack(ours)
    c = ours.config
    head_dim = c.head_dim
    hidden = torch.zeros(1, c.hidden_size)
    rope = torch.zeros(1, head_dim)
    mask = torch.ones(1, 8, dtype=torch.bool)
    cache = torch.zeros(c.num_hidden_layers, 1, c.num_key_value_heads, 8, head_dim)
    pos = torch.zeros(1, dtype=torch.int32)

    def decode(h=hidden, kv=cache, positions=pos, **kwargs):
        kwargs = {"key_mask": mask, "scaling": 1.0, "n_threads": 1, **kwargs}
        stack.decode(h, rope, rope, kv, kv, positions, **kwargs)

    with pytest.raises(ValueError, match="hidden must be"):
        decode(h=torch.zeros(1, c.hidden_size + 1))
    with pytest.raises(ValueError, match="keys must have shape"):
        decode(kv=torch.zeros(c.num_hidden_layers, 1, c.num_key_value_heads, 8, head_dim + 1))
    with pytest.raises(ValueError, match=r"keys .* and values .* differ"):
        stack.decode(hidden, rope, rope, cache[:1], cache, pos, key_mask=mask)
    with pytest.raises(ValueError, match=r"positions\[0\]=8 must be in \[0, 8\)"):
        decode(positions=torch.full((1,), 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="positions must be int32"):
        decode(positions=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_mask must be bool"):
        decode(key_mask=mask.float())
    with pytest.raises(ValueError, match="batch must be 1..8"):
        decode(h=torch.zeros(9, c.hidden_size))
    with pytest.raises(ValueError, match="n_threads"):
        decode(n_threads=0)
    with pytest.raises(TypeError, match="phase_seconds must be float64"):
        decode(phase_seconds=torch.zeros(5))
    pool = torch.zeros(c.num_hidden_layers, 3, 4, c.num_key_value_heads, head_dim)
    with pytest.raises(ValueError, match="block_table holds block 3; the pool has 3"):
        stack.decode(hidden, rope, rope, pool, pool, pos, block_table=torch.tensor([[1, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="a paged cache takes no key_mask"):
        table = torch.ones(1, 2, dtype=torch.int32)
        stack.decode(hidden, rope, rope, pool, pool, pos, key_mask=mask, block_table=table)
    phases = torch.zeros(5, dtype=torch.float64)
    start = time.perf_counter()
    decode(phase_seconds=phases)
    wall = time.perf_counter() - start
    assert (phases > 0).all() and phases.sum() <= wall
    layer = ours.model.layers[0]
    q = layer.self_attn.q_proj
    wrong = ("model.layers.0.self_attn.q_proj", q.packed[:-1], q.scales[:-1], q.offsets[:-1], None, q.format,
             q.group_size)
    others = [("x", m.packed, m.scales, m.offsets, None, m.format, m.group_size)
              for m in (layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj, layer.mlp.down_proj)]
    norm = layer.input_layernorm.weight.detach()
    with pytest.raises(ValueError, match=r"q_proj: has \d+ output rows, expected"):
        stack.add_layer(norm, norm, None, None, [wrong, *others])
    with pytest.raises(ValueError, match="post_norm must have shape"):
        stack.add_layer(norm, norm[:-1], None, None, [wrong, *others])
    with pytest.raises(ValueError, match="7 entries"):
        stack.add_layer(norm, norm, None, None, others)


def paged_decode(model, prompts: list[torch.Tensor], steps: int, fused: bool, monkeypatch):
    """Prefill each prompt into its own blocks of a paged pool, then ``steps`` decode steps of the whole
    batch (one token per sequence, greedy); the decode logits [steps, B, vocab] and the pool."""
    pool = model.new_paged_cache(num_blocks=32, block_size=4)
    tables, lengths, tokens = [], [], []
    with monkeypatch.context() as m, torch.inference_mode():
        if not fused:
            m.setattr(causal_lm, "runs_fused", lambda *args: False)
        for ids in prompts:
            blocks = pool.allocator.allocate(pool.blocks_for(len(ids) + steps))
            logits = model(ids.unsqueeze(0), cache=pool.step([blocks], [0], len(ids)), logits_to_keep=1)
            tables.append(blocks)
            lengths.append(len(ids))
            tokens.append(int(logits[0, -1].argmax()))
        out = []
        for _ in range(steps):
            step = pool.step(tables, lengths, 1)
            logits = model(torch.tensor(tokens).unsqueeze(1), cache=step, logits_to_keep=1)[:, -1]
            if fused:
                assert model._decoder_stack[1] is not None, "the paged step did not run fused"
            out.append(logits)
            tokens = logits.argmax(-1).tolist()
            lengths = [n + 1 for n in lengths]
    return torch.stack(out), pool


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_paged_decode_steps_match_python_blocks(arch, simd_level, monkeypatch):
    """The server's decode steps (a PagedKVCache, sequences of different lengths) run fused too."""
    torch.set_num_threads(2)
    _, ours = quantized_pair(arch)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 320, (n,), generator=gen) for n in (3, 9, 6)]
    fused, fused_pool = paged_decode(ours, prompts, 6, True, monkeypatch)
    python, python_pool = paged_decode(ours, prompts, 6, False, monkeypatch)
    tol = VNNI_PATH_TOL if simd_level in INTEGER_LEVELS else FLOAT_PATH_TOL
    torch.testing.assert_close(fused, python, **tol)
    torch.testing.assert_close(fused_pool.keys, python_pool.keys, **tol)
    torch.testing.assert_close(fused_pool.values, python_pool.values, **tol)
