"""TrellisForCausalLM against transformers' own implementation (the oracle), on tiny random models of
every supported architecture: prefill logits, cached step-by-step decode, left-padded batches, greedy
generation, quantized weights; plus the caches, sampling rules and bad input."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from metal_marlin import TrellisForCausalLM, replace_linear_layers
from metal_marlin.generation import SamplingParams, sample_next
from metal_marlin.models.cache import KVCache, MLACache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from test_replace import dequantized_twin  # noqa: E402
from tiny_models import CONFIGS, build_model  # noqa: E402

ARCHS = list(CONFIGS)
TOL = dict(rtol=0, atol=1e-4)
# The int4/int8 GEMV of the avx512_vnni path takes activations as 16-bit fixed point per 32-block
# (docs/kernels.md): about 2^-16 of each block's largest activation, a few 1e-5 on these logits.
QUANTIZED_TOL = dict(rtol=0, atol=3e-4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(3))


def runtime(hf_model) -> TrellisForCausalLM:
    return TrellisForCausalLM.from_hf_model(copy.deepcopy(hf_model))


def left_padded(ids: torch.Tensor, pads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 shortened by ``pads`` tokens and left-padded with token 0; its mask."""
    padded = ids.clone()
    padded[1, :pads] = 0
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    return padded, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_cached_decode_match_transformers(arch, ids):
    hf = build_model(arch)
    ours = runtime(hf)
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids), want, **TOL)
        cache = ours.new_cache(2, ids.shape[1])
        prefix = 5  # a prefill, then one token per step
        steps = [ours(ids[:, :prefix], cache=cache)] + [ours(ids[:, i:i + 1], cache=cache)
                                                        for i in range(prefix, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_and_greedy_generate(arch, ids):
    hf = build_model(arch)
    ours = runtime(hf)
    padded, mask = left_padded(ids, 4)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        want = hf(padded, attention_mask=mask, position_ids=positions).logits
        got = ours(padded, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **TOL)
    # row 1 alone, unpadded, gives the same logits as inside the padded batch
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[1:, 4:])[0], got[1, 4:], **TOL)
    expected = hf.generate(padded, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    generated = ours.generate(padded, attention_mask=mask, max_new_tokens=8, stop_token_ids=[])
    assert torch.equal(generated, expected)


@pytest.mark.parametrize(("arch", "fmt"), [("llama", "int4"), ("qwen3_moe", "int4"), ("glm4_moe_lite", "fp4"),
                                           ("deepseek_v3", "int8"), ("qwen3", "trellis"),
                                           ("glm4_moe_lite", "trellis")])
def test_quantized_weights_match_dequantized_transformers(arch, fmt, ids):
    original = build_model(arch)
    quantized = copy.deepcopy(original)
    replace_linear_layers(quantized, format=fmt, bits=3 if fmt == "trellis" else None, group_size=32)
    oracle = dequantized_twin(original, quantized)
    ours = TrellisForCausalLM.from_hf_model(quantized)
    with torch.no_grad():
        want = oracle(ids).logits
        torch.testing.assert_close(ours(ids), want, **QUANTIZED_TOL)
        cache = ours.new_cache(2, ids.shape[1])
        steps = torch.cat([ours(ids[:, i:i + 1], cache=cache) for i in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, want, **QUANTIZED_TOL)


def test_stop_tokens_and_padding_after_stop(ids):
    ours = runtime(build_model("llama"))
    free = ours.generate(ids, max_new_tokens=6, stop_token_ids=[])
    stop = int(free[0, ids.shape[1] + 2])  # row 0's third new token
    out = ours.generate(ids, max_new_tokens=6, stop_token_ids=[stop])
    row0 = out[0, ids.shape[1]:]
    first = int((row0 == stop).nonzero()[0])
    assert first <= 2 and torch.equal(row0[:first + 1], free[0, ids.shape[1]:][:first + 1])
    assert (row0[first + 1:] == stop).all()  # no pad id in the config: the stop id pads
    streamed = list(ours.generate_stream(ids, 6, stop_token_ids=[stop]))
    assert torch.equal(torch.stack(streamed, 1), out[:, ids.shape[1]:])


def test_seeded_sampling_is_reproducible(ids):
    ours = runtime(build_model("qwen3"))
    kw = dict(max_new_tokens=10, temperature=1.3, top_k=40, top_p=0.9, repetition_penalty=1.2, stop_token_ids=[])
    a = ours.generate(ids, seed=7, **kw)
    assert torch.equal(a, ours.generate(ids, seed=7, **kw))
    assert not torch.equal(a, ours.generate(ids, seed=8, **kw))


def test_sampling_rules_match_transformers_processors():
    """Repetition penalty, top-k and top-p against transformers' logits processors."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 3
    context = torch.randint(0, 50, (3, 7), generator=gen)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, context, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(context, logits.clone())
    greedy = sample_next(logits, SamplingParams(repetition_penalty=1.3), seen)
    assert torch.equal(greedy, want.argmax(-1))
    for top_k, top_p in ((5, 1.0), (0, 0.6), (8, 0.5)):
        warped = logits / 0.7
        if top_k:
            warped = TopKLogitsWarper(top_k)(context, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(context, warped)
        allowed = torch.isfinite(warped)
        params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
        draws = torch.stack([sample_next(logits, params, generator=torch.Generator().manual_seed(s))
                             for s in range(300)])
        hit = torch.zeros_like(allowed).scatter_(1, draws.T, True)
        assert not (hit & ~allowed).any(), (top_k, top_p)  # never outside the kept set
        assert (hit == allowed).float().mean() > 0.97  # and (almost) all of it is reached


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_new_tokens=-1), "max_new_tokens")])
def test_bad_generation_arguments(kwargs, match, ids):
    ours = runtime(build_model("llama"))
    with pytest.raises(ValueError, match=match):
        ours.generate(ids, **{"max_new_tokens": 2, **kwargs})


def test_unsupported_architecture_and_cache_overflow(ids):
    config = LlamaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)
    config.model_type = "mamba"
    with pytest.raises(ValueError, match=r"'mamba' is not supported.*llama, qwen2, qwen3, qwen3_moe, "
                                         r"glm4_moe_lite, deepseek_v3"):
        TrellisForCausalLM(config)
    ours = runtime(build_model("llama"))
    cache = ours.new_cache(2, 4)
    with pytest.raises(ValueError, match="the cache holds 4 positions; 0 are used and 13 more were given"):
        ours(ids, cache=cache)


def test_mla_latent_cache_is_smaller_than_per_head():
    """GLM-4.7-Flash's shape: 47 layers, 20 heads, kv_lora_rank 512, rope 64, nope 192, v 256."""
    latent = MLACache(47, 1, 1, 512, 64, torch.bfloat16, "meta")
    per_head = KVCache(47, 1, 1, 20, 192 + 64, 256, torch.bfloat16, "meta")
    assert latent.bytes_per_token() == 47 * 576 * 2
    assert per_head.bytes_per_token() == 47 * 20 * (256 + 256) * 2
    assert per_head.bytes_per_token() / latent.bytes_per_token() > 17


def test_from_pretrained_reads_transformers_directory(tmp_path, ids):
    hf = build_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "plain")
    ours = TrellisForCausalLM.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **TOL)
    assert isinstance(AutoModelForCausalLM, type)
