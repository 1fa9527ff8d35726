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
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..formats import GroupFormat, GroupQuantizedWeight, get_format
from ..nn import (
    DEFAULT_SKIP,
    MetalQuantizedLinear,
    QuantizedExperts,
    ReplacementSummary,
    plan_replacement,
    quantized_module,
    replace_module,
)
from ..nn.experts import PROJECTIONS
from ..quant.allocation import TensorCost, allocate_bits
from ..quant.gptq import gptq_quantize
from ..quant.hessian import HessianAccumulator
from .checkpoint import describe_quantized_modules, install_quantized_modules
from .sensitivity import measure_sensitivity, routed_tokens

# Calibration windows start after the first 8192 tokens, the slice perplexity is measured on.
CALIBRATION_OFFSET_TOKENS = 8192
# Under --bpw no matrix gets fewer bits; in MoE models these stay above the average (see _allocate).
MIN_ALLOCATED_BITS = 2
PROTECTED_IN_MOE = r"(self_attn|shared_expert)"


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


class ExpertStatistics:
    """Per-expert input Hessians of one fused experts module, from the tokens its forward routes to
    each expert (``routed_tokens``).

    Expert ``e``'s output is scaled by its routing weight ``w``, so its layer-output error is
    ``w * dW x``: inputs are accumulated as ``w * x`` (``gate_up_proj``) and ``w * act(gate) * up``
    (``down_proj``).
    """

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        features = {"gate_up_proj": hidden, "down_proj": two_i // 2}
        self.accumulators = {p: [HessianAccumulator(f) for _ in range(num_experts)] for p, f in features.items()}

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        _, routed = routed_tokens(module, args, kwargs)
        for e, _, x, w in routed:
            gate, up = (x @ self.experts.gate_up_proj[e].float().T).chunk(2, dim=-1)
            self.accumulators["gate_up_proj"][e].add(w * x)
            self.accumulators["down_proj"][e].add(w * self.experts.act_fn(gate) * up)

    def hessians(self) -> dict[str, list[torch.Tensor | None]]:
        """Per projection and expert the input Hessian, or None where calibration never routed a token."""
        return {p: [a.hessian() if a.rows else None for a in accs] for p, accs in self.accumulators.items()}


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
    Fused MoE experts get per-expert Hessians from the tokens routed to them (``ExpertStatistics``).
    Modules outside the decoder layers are quantized without calibration. ``bpw`` (trellis only) sets
    an average bits-per-weight budget and chooses each tensor's bits, per expert in MoE models
    (``metal_marlin.quant.allocation``).
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


def _allocate(model: nn.Module, planned: dict, batches: torch.Tensor, bpw: float) -> dict[str, Any]:
    """Bits per trellis tensor for the ``bpw`` budget, priced by each matrix's loss sensitivity
    (``sensitivity.measure_sensitivity``: per expert in MoE models) and ``mean(W^2)``.

    Every matrix keeps at least 2 bits: at 1 bit the trellis error (27% of the weight variance) is far
    outside the small-error regime the proxy assumes. In MoE models attention and shared experts get at
    least ``ceil(bpw) + 1`` bits: they are small and used by every token, while routed experts are where
    the budget is spent.
    """
    linears = {n: m for n, (m, s) in planned.items() if s["format"] == "trellis" and isinstance(m, nn.Linear)}
    experts = {n: m for n, (m, s) in planned.items() if s["format"] == "trellis" and not isinstance(m, nn.Linear)}
    if not linears and not experts:
        raise ValueError("bpw allocation needs trellis modules (format='trellis')")
    linear_sensitivity, expert_sensitivity = measure_sensitivity(model, linears, experts, batches)
    costs = [TensorCost(n, m.out_features, m.in_features, m.weight.detach().double().square().mean().item(),
                        linear_sensitivity[n]) for n, m in linears.items()]
    for name, module in experts.items():
        for p in PROJECTIONS:
            weight = getattr(module, p).detach().double()
            for e, sensitivity in enumerate(expert_sensitivity[name][p]):
                costs.append(TensorCost(f"{name}.{p}.{e}", weight.shape[1], weight.shape[2],
                                        weight[e].square().mean().item(), sensitivity))
    floors: dict[str, int] = {}
    if experts:
        protected = min(math.ceil(bpw) + 1, 8)
        floors.update({n: protected for n in linears if re.search(PROTECTED_IN_MOE, n)})
    bits = allocate_bits(costs, bpw, min_bits=MIN_ALLOCATED_BITS, floors=floors)
    chosen: dict[str, Any] = {n: bits[n] for n in linears}
    for name, module in experts.items():
        chosen[name] = {p: [bits[f"{name}.{p}.{e}"] for e in range(module.gate_up_proj.shape[0])]
                        for p in PROJECTIONS}
    return chosen


def _quantize_layer(layer, layer_prefix, targets, captured, calibration, state, bar) -> None:
    accumulators: dict[str, HessianAccumulator] = {}
    expert_stats: dict[str, ExpertStatistics] = {}
    handles = []
    for name, module, _ in targets:
        if isinstance(module, nn.Linear):
            accumulators[name] = HessianAccumulator(module.in_features)
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, acc=accumulators[name]: acc.add(args[0])))
        else:
            expert_stats[name] = ExpertStatistics(module)
            handles.append(module.register_forward_pre_hook(expert_stats[name].hook, with_kwargs=True))
    try:
        _run_layer(layer, captured)
    finally:
        for h in handles:
            h.remove()
    for name, module, settings in targets:
        state.tensor = layer_prefix + name
        if bar is not None:
            bar.set_postfix_str(f"{name} ({state.tiles_per_second():.0f} tiles/s)" if state.tiles else name)
        full_name = layer_prefix + name
        hessian = accumulators[name].hessian() if name in accumulators else expert_stats[name].hessians()
        if settings["format"] == "trellis":
            new = quantized_module(full_name, module, settings, hessian=hessian)
            state.tiles += sum(p.numel() for p in module.parameters()) // 256
            replace_module(layer, name, new)
            continue
        fmt = get_format(settings["format"], settings["bits"])
        if isinstance(module, nn.Linear):
            new = MetalQuantizedLinear.from_quantized(_gptq(module.weight, hessian, fmt, settings, calibration,
                                                            full_name), module.bias, name=full_name)
        else:
            stacked = {p: GroupQuantizedWeight.stack([
                _gptq(getattr(module, p)[e], hessian[p][e], fmt, settings, calibration, f"{full_name}.{p}.{e}")
                for e in range(module.gate_up_proj.shape[0])]) for p in PROJECTIONS}
            new = QuantizedExperts.from_quantized(stacked["gate_up_proj"], stacked["down_proj"], module.act_fn,
                                                  settings["group_size"], name=full_name)
        replace_module(layer, name, new)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor | None, fmt: GroupFormat, settings: dict[str, Any],
          calibration: CalibrationSettings, name: str) -> GroupQuantizedWeight:
    """GPTQ with the module's settings; round to nearest where calibration never reached (an unused expert)."""
    group = dict(group_size=settings["group_size"], symmetric=settings["symmetric"],
                 scale_method=settings["scale_method"])
    if hessian is None:
        return fmt.quantize(weight.detach(), name=name, **group)
    return gptq_quantize(weight.detach(), hessian, fmt, act_order=calibration.act_order, damp=calibration.damp,
                         name=name, **group)
