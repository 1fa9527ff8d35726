"""Checkpoint save/load: identical logits through our loader and transformers' from_pretrained, for every
format; corrupt checkpoints give clear errors and saving never leaves a partial checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from metal_marlin import (
    CheckpointError,
    TrellisForCausalLM,
    _core,
    load_quantized_model,
    replace_linear_layers,
    save_quantized,
)
from metal_marlin.models import checkpoint as checkpoint_module
from metal_marlin.models.info import describe_checkpoint
from metal_marlin.nn import TrellisExperts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from tiny_models import build_model  # noqa: E402

IDS = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))


def quantized_model(arch: str = "llama", fmt: str = "int4", group_size: int = 32, symmetric=None):
    model = build_model(arch)
    replace_linear_layers(model, format=fmt, group_size=group_size, symmetric=symmetric)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_runtime_matches(loaded, model) -> None:
    """``load_quantized_model`` returns our runtime: same weights, rounding differences only (float32, and on
    the integer CPU paths the 16-bit activation rounding of the int4/int8 matmuls, which our runtime and
    transformers' blocks, computing in a different order, can land on either side of; docs/kernels.md)."""
    assert isinstance(loaded, TrellisForCausalLM)
    atol = 5e-4 if _core.simd_level() in ("avx512_vnni", "avx512_amx") else 1e-5
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=atol)


@pytest.mark.parametrize(("fmt", "symmetric"), [("int2", None), ("int3", None), ("int4", None), ("int4", True),
                                                ("int8", None), ("fp4", None), ("fp8", None)])
def test_round_trip_every_format(tmp_path, fmt, symmetric):
    model = quantized_model("llama", fmt, 32, symmetric)
    save_quantized(model, tmp_path / "ck", max_shard_bytes=100_000)
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 1
    loaded, tokenizer = load_quantized_model(tmp_path / "ck")
    assert tokenizer is None
    assert_runtime_matches(loaded, model)
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(via_hf), logits(model))


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "glm4_moe_lite"])
def test_round_trip_architectures(tmp_path, arch):
    model = quantized_model(arch, "int4", -1)
    save_quantized(model, tmp_path / "ck")
    loaded, _ = load_quantized_model(tmp_path / "ck")
    assert_runtime_matches(loaded, model)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), logits(model))


def test_quantization_config_contents(tmp_path):
    model = build_model("llama")
    replace_linear_layers(model, format="int4", group_size=32, layer_config={r"down_proj": {"format": "int8"}})
    save_quantized(model, tmp_path / "ck", quantizer={"method": "rtn", "scale_method": "mse"})
    qconfig = json.loads((tmp_path / "ck" / "quantization_config.json").read_text())
    assert qconfig["format_version"] == 1 and qconfig["quant_method"] == "metal_marlin"
    assert qconfig["default"] == {"format": "int4", "bits": 4, "group_size": 32, "symmetric": False}
    assert qconfig["modules"]["model.layers.1.mlp.down_proj"]["format"] == "int8"
    assert qconfig["dense_modules"] == ["lm_head"]
    assert qconfig["quantizer"] == {"method": "rtn", "scale_method": "mse"}
    embedded = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert embedded == qconfig


def test_refuses_existing_checkpoint_unless_overwrite(tmp_path):
    first, second = quantized_model(fmt="int4"), quantized_model(fmt="int8")
    save_quantized(first, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        save_quantized(second, tmp_path / "ck")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    save_quantized(second, tmp_path / "ck", overwrite=True)
    loaded, _ = load_quantized_model(tmp_path / "ck")
    assert torch.equal(logits(loaded), logits(second))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a checkpoint; refusing"):
        save_quantized(second, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_crash_mid_save_leaves_nothing(tmp_path, monkeypatch):
    model = quantized_model()
    save_quantized(model, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save)
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "old", True)):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            save_quantized(model, target, overwrite=overwrite, max_shard_bytes=50_000)
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "temporary directories were left behind"


@pytest.fixture()
def saved(tmp_path) -> Path:
    save_quantized(quantized_model(), tmp_path / "ck", max_shard_bytes=100_000)
    return tmp_path / "ck"


def shard_of(path: Path, key: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_truncated_shard(saved):
    shard = shard_of(saved, "model.layers.0.self_attn.q_proj.packed")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable or truncated"):
        load_quantized_model(saved)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.scales", "model.norm.weight"])
def test_missing_tensor(saved, key):
    shard = shard_of(saved, key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"missing.*{key.replace('.', '[.]')}"):
        load_quantized_model(saved)
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"missing tensors: {key.replace('.', '[.]')}"):
        load_quantized_model(saved)


def test_wrong_shape(saved):
    key = "model.layers.1.mlp.up_proj.packed"
    shard = shard_of(saved, key)
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(160, 11\).*expects \(160, 12\)"):
        load_quantized_model(saved)


def test_unexpected_tensor(saved):
    shard = shard_of(saved, "model.norm.weight")
    tensors = load_file(shard)
    tensors["model.bogus"] = torch.zeros(3)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="do not belong to the model: model.bogus"):
        load_quantized_model(saved)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("format_version", 2, "unknown checkpoint format version 2"),
    ("quant_method", "gptq", "quant_method is 'gptq'"),
])
def test_bad_quantization_config(saved, field, value, match):
    file = saved / "quantization_config.json"
    qconfig = json.loads(file.read_text())
    qconfig[field] = value
    file.write_text(json.dumps(qconfig))
    with pytest.raises(CheckpointError, match=match):
        load_quantized_model(saved)


def test_unknown_format_in_module(saved):
    file = saved / "quantization_config.json"
    qconfig = json.loads(file.read_text())
    qconfig["modules"]["model.layers.0.mlp.up_proj"]["format"] = "int7"
    file.write_text(json.dumps(qconfig))
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.*unknown format 'int7'"):
        load_quantized_model(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a metal-marlin checkpoint"):
        load_quantized_model(tmp_path)


def test_trellis_round_trip(tmp_path):
    model = build_model("qwen3_moe")
    replace_linear_layers(model, format="trellis", bits=2, codebook="mul1", group_size=32,
                          layer_config={r"0\.mlp\.experts$": {"format": "int3"}})
    bits = {"gate_up_proj": [2, 3, 4, 2, 3, 4, 2, 3], "down_proj": [4, 3, 2, 4, 3, 2, 4, 5]}
    experts = TrellisExperts.from_float(build_model("qwen3_moe").model.layers[1].mlp.experts, bits=bits,
                                        codebook="mul1", name="model.layers.1.mlp.experts")
    model.model.layers[1].mlp.experts = experts
    save_quantized(model, tmp_path / "ck")
    qconfig = json.loads((tmp_path / "ck" / "quantization_config.json").read_text())
    spec = qconfig["modules"]["model.layers.1.self_attn.q_proj"]
    assert spec | {} == {**spec, "format": "trellis", "bits": 2, "codebook": "mul1", "had_in": 32, "had_out": 128}
    assert qconfig["modules"]["model.layers.1.mlp.experts"] == {
        "kind": "experts", "format": "trellis", "codebook": "mul1", "num_experts": 8, "hidden_dim": 96,
        "intermediate_dim": 64, "expert_bits": bits, "hadamard_blocks": {"gate_up_proj": [32, 128],
                                                                         "down_proj": [64, 32]}}
    assert qconfig["modules"]["model.layers.0.mlp.experts"]["format"] == "int3"
    assert not any(".experts." in name for name in qconfig["modules"])  # per-expert matrices are not modules
    assert qconfig["default"]["format"] == "trellis"
    assert "trellis K=2/3/4/5" in describe_checkpoint(tmp_path / "ck")
    loaded, _ = load_quantized_model(tmp_path / "ck")
    assert_runtime_matches(loaded, model)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ck")), logits(model))
