"""The metal-marlin command: in-process for speed, plus the installed entry point for exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metal_marlin import load_quantized_model
from metal_marlin.cli import main
from metal_marlin.models.loading import embedded_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
from gguf_builder import write_llama_gguf  # noqa: E402
from test_gguf import tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_llama_gguf(tiny_llama(), str(path))
    return path


def test_quantize_info_and_overwrite(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["quantize", str(tiny_gguf), str(out), "--format", "int", "--bits", "3", "--group-size", "64"]) == 0
    qconfig = json.loads((out / "quantization_config.json").read_text())
    assert qconfig["default"] == {"format": "int3", "bits": 3, "group_size": 64, "symmetric": False}
    assert qconfig["quantizer"]["source"] == str(tiny_gguf)
    model, _ = load_quantized_model(out)
    assert model.model.layers[0].mlp.down_proj.format == "int3"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int3" in text and "format version 1" in text and "lm_head" in text
    assert main(["quantize", str(tiny_gguf), str(out), "--format", "int8"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert json.loads((out / "quantization_config.json").read_text()) == qconfig
    assert main(["quantize", str(tiny_gguf), str(out), "--format", "int8", "--overwrite"]) == 0
    assert json.loads((out / "quantization_config.json").read_text())["default"]["format"] == "int8"


def test_info_gguf(capsys):
    assert main(["info", str(embedded_model_path())]) == 0
    text = capsys.readouterr().out
    assert "Q4_1" in text and "210" in text and "architecture llama" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["quantize", "nowhere.gguf", "out"], "nowhere.gguf: no such file or directory"),
    (["quantize", "x", "out", "--format", "int5"], "unknown format 'int5'"),
    (["info", "."], "not a metal-marlin checkpoint or a GGUF file"),
    (["eval", "--text", "missing.txt"], "missing.txt"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1"),
])
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("metal-marlin: error: ") and message in err and err.count("\n") == 1


def test_generate_embedded_default(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "6"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_eval_on_a_text_file(tiny_gguf, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"line {i} of a small test corpus." for i in range(200)))
    from metal_marlin.eval import perplexity  # noqa: F401  (the CLI reports what this computes)

    assert main(["eval", "--text", str(text), "--seq-len", "64", "--max-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "4 windows of 64 tokens, 252 targets" in out


def test_entry_point_exit_codes():
    help_run = subprocess.run(["metal-marlin", "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and "quantize" in help_run.stdout and "chat" in help_run.stdout
    bad = subprocess.run(["metal-marlin", "info", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "metal-marlin: error: /nonexistent: no such file or directory"


def test_chat_reads_stdin_until_eof():
    run = subprocess.run(["metal-marlin", "chat", "--max-tokens", "8"], input="What is the capital of France?\n",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_threads_flag():
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "info", str(embedded_model_path())]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_quantize_trellis_and_info(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["quantize", str(tiny_gguf), str(out), "--format", "trellis", "--bits", "3", "--method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trellis K=3" in text and "3inst" in text
    row = next(line for line in text.splitlines() if line.startswith("trellis K=3"))
    assert abs(float(row.split()[-1]) - 3.0) < 0.3  # bits/weight: 3 plus the two float16 vectors
    assert main(["quantize", str(tiny_gguf), str(tmp_path / "x"), "--format", "int4", "--method", "ldlq"]) == 1
    assert "does not apply to format int4" in capsys.readouterr().err
