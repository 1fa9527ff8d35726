"""GGUF import: lossless mapping of Q4_0 / Q4_1 / Q8_0, the q/k row order, unsupported types, bad files."""

from __future__ import annotations

import copy

import pytest
import torch
from gguf_builder import write_llama_gguf
from transformers import LlamaConfig, LlamaForCausalLM

from metal_marlin import MetalQuantizedLinear, read_gguf
from metal_marlin.models.gguf import GGUFImportError, build_model_from_gguf


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(("qtype", "fmt", "symmetric"), [("Q4_1", "int4", False), ("Q4_0", "int4", True),
                                                         ("Q8_0", "int8", True)])
def test_lossless_import_matches_gguf_dequantization(tmp_path, qtype, fmt, symmetric):
    model = tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    reference = write_llama_gguf(model, path, linear_type=qtype)
    imported = read_gguf(path)
    for name, want in reference.items():
        got = imported.tensors[name]
        if want.dim() == 2 and "embed" not in name:
            assert (got.format.name, got.symmetric, got.group_size) == (fmt, symmetric, 32), name
            got = got.dequantize()
        assert torch.equal(got, want), f"{name} differs from gguf's own dequantization"
    assert imported.source_types["model.layers.0.self_attn.q_proj.weight"] == qtype


def test_imported_model_equals_transformers_model_with_gguf_weights(tmp_path):
    model = tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    reference = write_llama_gguf(model, path, linear_type="Q4_1")
    twin = copy.deepcopy(model)
    twin.load_state_dict(reference, strict=False)
    imported = build_model_from_gguf(read_gguf(path))
    assert isinstance(imported.model.layers[1].mlp.down_proj, MetalQuantizedLinear)
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)


def test_tied_embeddings(tmp_path):
    model = tiny_llama(tie=True)
    path = str(tmp_path / "tied.gguf")
    write_llama_gguf(model, path)
    imported = build_model_from_gguf(read_gguf(path))
    assert imported.config.tie_word_embeddings
    assert imported.lm_head.weight.data_ptr() == imported.model.embed_tokens.weight.data_ptr()


def test_unsupported_type_is_refused_or_requantized_with_warning(tmp_path):
    model = tiny_llama()
    path = str(tmp_path / "q5.gguf")
    reference = write_llama_gguf(model, path, type_overrides={"model.layers.1.mlp.up_proj.weight": "Q5_0"})
    with pytest.raises(GGUFImportError, match=r"blk\.1\.ffn_up\.weight.*Q5_0.*no lossless mapping"):
        read_gguf(path, on_unsupported="error")
    with pytest.warns(UserWarning, match=r"blk\.1\.ffn_up\.weight.*Q5_0 is requantized to int8 g32"):
        imported = read_gguf(path)
    up = imported.tensors["model.layers.1.mlp.up_proj.weight"]
    want = reference["model.layers.1.mlp.up_proj.weight"]
    assert up.format.name == "int8"
    assert ((up.dequantize() - want).norm() / want.norm()).item() < 0.01


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf(str(tmp_path / "missing.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(GGUFImportError, match="junk.gguf: not a readable GGUF file"):
        read_gguf(str(junk))
    good = tmp_path / "good.gguf"
    write_llama_gguf(tiny_llama(), str(good))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GGUFImportError, match="truncated.gguf"):
        read_gguf(str(truncated))
