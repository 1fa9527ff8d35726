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
from metal_marlin.nn import DenseExperts

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


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_trellis_ldlq_pipeline_beats_plain_trellis(arch):
    original = build_model(arch)
    ids = torch.tensor([CharTokenizer()(TEXT[:200]).input_ids[:96]])
    plain = copy.deepcopy(original)
    replace_linear_layers(plain, format="trellis", bits=2)
    ldlq = copy.deepcopy(original)
    quantize_model(ldlq, CharTokenizer(), format="trellis", bits=2, calibration_text=TEXT, calibration=SETTINGS)
    assert output_error(ldlq, original, ids) < output_error(plain, original, ids)


def test_calibrated_experts_beat_uncalibrated_experts():
    """Only the experts differ: per-expert Hessians (GPTQ, LDLQ) must lower the model's output error."""
    original = build_model("qwen3_moe")
    ids = torch.tensor([CharTokenizer()(TEXT[:200]).input_ids[:96]])
    keep_rest = {r"^(?!.*experts$)": None}
    for fmt, bits in (("int3", None), ("trellis", 2)):
        rtn = copy.deepcopy(original)
        replace_linear_layers(rtn, format=fmt, bits=bits, group_size=32, layer_config=keep_rest)
        calibrated = copy.deepcopy(original)
        quantize_model(calibrated, CharTokenizer(), format=fmt, bits=bits, group_size=32, layer_config=keep_rest,
                       calibration_text=TEXT, calibration=SETTINGS)
        kinds = {type(m).__name__ for n, m in calibrated.named_modules() if n.endswith("experts")}
        assert kinds == {"QuantizedExperts" if fmt == "int3" else "TrellisExperts"}
        assert output_error(calibrated, original, ids) < output_error(rtn, original, ids), fmt


def test_expert_statistics_against_float64():
    """Per-expert Hessians equal a direct float64 computation over the routed tokens."""
    torch.manual_seed(0)
    experts = DenseExperts(torch.randn(4, 2 * 16, 32) * 0.2, torch.randn(4, 32, 16) * 0.2, torch.nn.functional.silu)
    hidden = torch.randn(10, 32)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0], [2, 4], [0, 1], [2, 1], [1, 0], [0, 2], [4, 1]])
    weights = torch.rand(10, 2)
    stats = pipeline.ExpertStatistics(experts)
    stats.hook(experts, (hidden, index), {"top_k_weights": weights})
    hessians = stats.hessians()
    assert hessians["gate_up_proj"][3] is None and hessians["down_proj"][3] is None  # never routed
    for e in range(3):
        rows, slots = (index == e).nonzero(as_tuple=True)
        x, w = hidden[rows].double(), weights[rows, slots].double().unsqueeze(-1)
        gate, up = (x @ experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        inner = torch.nn.functional.silu(gate) * up
        for p, v in (("gate_up_proj", w * x), ("down_proj", w * inner)):
            torch.testing.assert_close(hessians[p][e], v.T @ v / len(rows), rtol=1e-5, atol=1e-6)
