"""Calibrated layer-by-layer quantization: better than RTN, resumable, refuses a mismatched work dir."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from metal_marlin import MetalQuantizedLinear, replace_linear_layers
from metal_marlin.models import quantize as pipeline
from metal_marlin.models.quantize import CalibrationSettings, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from tiny_models import build_model  # noqa: E402

TEXT = "".join(chr(32 + (i * 7919) % 90) for i in range(12000))
SETTINGS = CalibrationSettings(n_samples=6, seq_len=64)


class CharTokenizer:
    """Characters to ids: enough to feed calibration windows to a tiny random model."""

    class _Encoded:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Encoded([ord(c) % 320 for c in text])


def output_error(model, reference, ids) -> float:
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_gptq_pipeline_beats_rtn(arch):
    original = build_model(arch)
    ids = torch.tensor([CharTokenizer()(TEXT[:200]).input_ids[:96]])
    rtn = copy.deepcopy(original)
    replace_linear_layers(rtn, format="int3", group_size=32)
    gptq = copy.deepcopy(original)
    summary = quantize_model(gptq, CharTokenizer(), format="int3", group_size=32, calibration_text=TEXT,
                             calibration=SETTINGS)
    assert "lm_head" in summary.kept_dense and len(summary.replaced) > 0
    assert all(isinstance(gptq.get_submodule(n), torch.nn.Module) for n in summary.replaced)
    assert output_error(gptq, original, ids) < output_error(rtn, original, ids)


def test_resume_after_a_kill(tmp_path, monkeypatch):
    original = build_model("llama")
    ids = torch.tensor([CharTokenizer()(TEXT[:100]).input_ids[:64]])
    uninterrupted = copy.deepcopy(original)
    quantize_model(uninterrupted, CharTokenizer(), format="int4", group_size=32, calibration_text=TEXT,
                   calibration=SETTINGS)

    real = pipeline._quantize_layer
    calls = []

    def dies_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_quantize_layer", dies_on_second_layer)
    first = copy.deepcopy(original)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(first, CharTokenizer(), format="int4", group_size=32, calibration_text=TEXT,
                       calibration=SETTINGS, work_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("layer_*")) == ["layer_0000.json", "layer_0000.safetensors"]

    calls.clear()
    resumed = copy.deepcopy(original)
    quantize_model(resumed, CharTokenizer(), format="int4", group_size=32, calibration_text=TEXT,
                   calibration=SETTINGS, work_dir=tmp_path)
    assert len(calls) == 1, "the finished layer was quantized again"
    assert isinstance(resumed.model.layers[0].mlp.up_proj, MetalQuantizedLinear)
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, uninterrupted(ids).logits)

    with pytest.raises(ValueError, match="different settings"):
        quantize_model(copy.deepcopy(original), CharTokenizer(), format="int3", group_size=32,
                       calibration_text=TEXT, calibration=SETTINGS, work_dir=tmp_path)


def test_calibration_text_too_short():
    with pytest.raises(ValueError, match="fewer than one window"):
        quantize_model(build_model("llama"), CharTokenizer(), format="int4", group_size=32, calibration_text="ab",
                       calibration=SETTINGS)


def test_trellis_ldlq_pipeline_beats_plain_trellis():
    original = build_model("llama")
    ids = torch.tensor([CharTokenizer()(TEXT[:200]).input_ids[:96]])
    plain = copy.deepcopy(original)
    replace_linear_layers(plain, format="trellis", bits=2)
    ldlq = copy.deepcopy(original)
    quantize_model(ldlq, CharTokenizer(), format="trellis", bits=2, calibration_text=TEXT, calibration=SETTINGS)
    assert output_error(ldlq, original, ids) < output_error(plain, original, ids)
