"""Calibrated quantization of a transformers model, one decoder layer at a time.

The inputs of the first decoder layer are captured for every calibration sequence; then, layer by
layer, forward hooks accumulate each linear module's input Hessian ``H = E[x x^T]``, the modules are
quantized with it (GPTQ for group formats, BlockLDLQ for trellis), and the quantized layer is run
again to produce the next layer's inputs. Peak memory is the model plus the calibration activations
and one layer's Hessians. Each finished layer is written atomically to a work directory, so a killed
run continues from the last finished layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..formats import GroupFormat, get_format
from ..nn import DEFAULT_SKIP, ReplacementSummary, plan_replacement, quantized_module, replace_module
from ..nn.linear import MetalQuantizedLinear
from ..quant.allocation import TensorCost, allocate_bits
from ..quant.gptq import gptq_quantize
from ..quant.hessian import HessianAccumulator
from .checkpoint import describe_quantized_modules, install_quantized_modules

# Calibration windows start after the first 8192 tokens, the slice perplexity is measured on.
CALIBRATION_OFFSET_TOKENS = 8192


@dataclass
class CalibrationSettings:
    n_samples: int = 32
    seq_len: int = 512
    offset_tokens: int = CALIBRATION_OFFSET_TOKENS
    act_order: bool = False
    damp: float = 0.01


class _CapturedInputs(Exception):
    """Raised by the first layer's hook once its inputs are recorded (ends the forward early)."""


def calibration_batches(tokenizer, text: str, settings: CalibrationSettings) -> torch.Tensor:
    """``[n, seq_len]`` token windows of ``text`` starting at ``offset_tokens`` (fewer if the text is short)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    offset = settings.offset_tokens if len(ids) >= settings.offset_tokens + settings.seq_len else 0
    ids = ids[offset:]
    n = min(settings.n_samples, len(ids) // settings.seq_len)
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {settings.seq_len}")
    return torch.tensor(ids[: n * settings.seq_len]).reshape(n, settings.seq_len)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList with ``num_hidden_layers`` entries)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: torch.Tensor):
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _CapturedInputs

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in batches:
            with contextlib.suppress(_CapturedInputs):
                model(row.unsqueeze(0), use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, captured: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    outputs = []
    for args, kwargs in captured:
        out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _write_atomic(directory: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    tmp_tensors, tmp_meta = directory / f".{stem}.safetensors.tmp", directory / f".{stem}.json.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_tensors))
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_tensors, directory / f"{stem}.safetensors")
    os.replace(tmp_meta, directory / f"{stem}.json")  # the .json marks the layer as finished


@dataclass
class QuantizeProgress:
    """What a progress display shows: layer, tensor, tiles per second."""

    layer: int = 0
    tensor: str = ""
    tiles: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tiles_per_second(self) -> float:
        return self.tiles / max(time.perf_counter() - self.started, 1e-9)


def quantize_model(
    model: nn.Module,
    tokenizer,
    format: str = "int4",
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool | None = None,
    scale_method: str = "mse",
    codebook: str = "3inst",
    skip: Iterable[str] = DEFAULT_SKIP,
    layer_config: Mapping[str, Mapping[str, Any] | None] | None = None,
    calibration_text: str | None = None,
    calibration: CalibrationSettings | None = None,
    work_dir: str | os.PathLike | None = None,
    bpw: float | None = None,
    progress: bool = False,
) -> ReplacementSummary:
    """Quantize ``model`` in place with calibration (GPTQ / trellis LDLQ), layer by layer.

    ``calibration_text`` defaults to the default corpus. With ``work_dir``, finished layers are saved
    there and an interrupted run with the same settings continues from the last finished layer.
    Modules outside the decoder layers, and fused MoE experts (no per-expert Hessians yet), are
    quantized without calibration. ``bpw`` (trellis only) sets an average bits-per-weight budget and
    chooses each tensor's bits (``metal_marlin.quant.allocation``).
    """
    from ..eval import load_corpus

    calibration = calibration or CalibrationSettings()
    defaults = {"format": format, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                "scale_method": scale_method, "codebook": codebook}
    plan, dense = plan_replacement(model, defaults, skip, layer_config)
    planned = {name: (module, settings) for name, module, settings in plan}
    summary = ReplacementSummary(kept_dense=dense)
    text = load_corpus() if calibration_text is None else calibration_text
    batches = calibration_batches(tokenizer, text, calibration)
    if bpw is not None:
        for name, bits in _allocate(model, planned, batches, bpw).items():
            module, settings = planned[name]
            planned[name] = (module, {**settings, "bits": bits})
    run_key = {"settings": {k: str(v) for k, v in defaults.items()}, "skip": list(skip),
               "layer_config": {k: v for k, v in (layer_config or {}).items()},
               "calibration": calibration.__dict__, "bpw": bpw,
               "modules": {name: str(settings) for name, (_, settings) in sorted(planned.items())}}
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        key_file = work / "run.json"
        if key_file.exists() and json.loads(key_file.read_text()) != json.loads(json.dumps(run_key)):
            raise ValueError(f"{work}: holds a quantization run with different settings; remove it to start over")
        key_file.write_text(json.dumps(run_key, indent=2))

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    state = QuantizeProgress()
    with torch.no_grad():
        captured = _capture_first_layer_inputs(model, layers, batches)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers), desc="quantizing", unit="layer")
        for i, layer in enumerate(layers):
            state.layer = i
            layer_prefix = f"{prefix}.{i}."
            targets = [(name[len(layer_prefix):], *planned[name]) for name in planned if name.startswith(layer_prefix)]
            before = sum(t.numel() * t.element_size() for _, m, _ in targets for t in m.parameters())
            done = work / f"layer_{i:04d}.json" if work is not None else None
            if done is not None and done.exists():
                meta = json.loads(done.read_text())
                install_quantized_modules(layer, meta, "cpu")
                layer.load_state_dict(load_file(str(work / f"layer_{i:04d}.safetensors")), strict=False)
            else:
                _quantize_layer(layer, layer_prefix, targets, captured, calibration, state, bar)
                if work is not None:
                    modules, _ = describe_quantized_modules(layer)
                    tensors = {k: v for k, v in layer.state_dict().items()
                               if any(k.startswith(m + ".") for m in modules)}
                    _write_atomic(work, f"layer_{i:04d}", tensors, {"modules": modules})
            after = sum(t.numel() * t.element_size() for name, _, _ in targets
                        for t in (*layer.get_submodule(name).parameters(), *layer.get_submodule(name).buffers()))
            summary.bytes_before += before
            summary.bytes_after += after
            summary.replaced += [layer_prefix + name for name, _, _ in targets]
            captured = _run_layer(layer, captured)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        # Whatever lies outside the decoder layers (rarely anything besides the skipped lm_head).
        for name, (module, settings) in planned.items():
            if not name.startswith(prefix + "."):
                summary.bytes_before += sum(t.numel() * t.element_size() for t in module.parameters())
                new = quantized_module(name, module, settings)
                summary.bytes_after += sum(t.numel() * t.element_size() for t in (*new.parameters(), *new.buffers()))
                replace_module(model, name, new)
                summary.replaced.append(name)
    return summary


def _allocate(model: nn.Module, planned: dict, batches: torch.Tensor, bpw: float) -> dict[str, int]:
    """Bits per trellis tensor for the ``bpw`` budget, from one calibration pass measuring ``E||x||^2``."""
    targets = {n: m for n, (m, s) in planned.items() if s["format"] == "trellis" and isinstance(m, nn.Linear)}
    if not targets:
        raise ValueError("bpw allocation needs trellis modules (format='trellis')")
    energy = {n: [0.0, 0] for n in targets}

    def hook(name):
        def record(mod, args):
            x = args[0].detach().float()
            energy[name][0] += x.square().sum().item()
            energy[name][1] += x.numel() // x.shape[-1]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for row in batches:
                model(row.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    costs = [TensorCost(n, m.out_features, m.in_features, m.weight.detach().double().square().mean().item(),
                        energy[n][0] / max(energy[n][1], 1)) for n, m in targets.items()]
    return allocate_bits(costs, bpw)


def _quantize_layer(layer, layer_prefix, targets, captured, calibration, state, bar) -> None:
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for name, module, _ in targets:
        if isinstance(module, nn.Linear):
            accumulators[name] = HessianAccumulator(module.in_features)
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, acc=accumulators[name]: acc.add(args[0])))
    try:
        _run_layer(layer, captured)
    finally:
        for h in handles:
            h.remove()
    for name, module, settings in targets:
        state.tensor = layer_prefix + name
        if bar is not None:
            bar.set_postfix_str(f"{name} ({state.tiles_per_second():.0f} tiles/s)" if state.tiles else name)
        hessian = accumulators[name].hessian() if name in accumulators else None
        fmt = get_format(settings["format"], settings["bits"])
        if hessian is None:
            new = quantized_module(layer_prefix + name, module, settings)
        elif isinstance(fmt, GroupFormat):
            qw = gptq_quantize(module.weight, hessian, fmt, settings["group_size"], settings["symmetric"],
                               settings["scale_method"], calibration.act_order, calibration.damp,
                               name=layer_prefix + name)
            new = MetalQuantizedLinear.from_quantized(qw, module.bias, name=layer_prefix + name)
        else:
            new = quantized_module(layer_prefix + name, module, settings, hessian=hessian)
            state.tiles += module.weight.numel() // 256
        replace_module(layer, name, new)
