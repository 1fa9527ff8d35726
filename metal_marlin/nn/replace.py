"""``replace_linear_layers``: quantize a transformers model's linear layers and fused MoE experts in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..formats import get_format, resolve_group_size
from .experts import DenseExperts, QuantizedExperts
from .linear import MetalQuantizedLinear

# Embeddings are not nn.Linear and are never touched; the output head is kept dense by default
# because it is often tied to the embedding and is the most quantization-sensitive matrix.
DEFAULT_SKIP = (r"(^|\.)lm_head$",)
SETTING_KEYS = ("format", "group_size", "symmetric", "scale_method")


@dataclass
class ReplacementSummary:
    """What ``replace_linear_layers`` did: module names and weight bytes before/after."""

    replaced: list[str] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} modules ({len(self.kept_dense)} kept dense): "
                f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                f"({self.compression:.2f}x smaller)")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts layout: 3-D ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``,
    no other parameters (biased or interleaved variants are left dense)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    e, two_i, h = gate_up.shape
    own = {n for n, _ in module.named_parameters(recurse=False)}
    return own == {"gate_up_proj", "down_proj"} and tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _settings_for(name: str, defaults: dict[str, Any], skip: list[re.Pattern],
                  layer_config: list[tuple[re.Pattern, Mapping[str, Any] | None]]) -> dict[str, Any] | None:
    """The settings for one module, or None to keep it dense. The first matching pattern wins."""
    for pattern, override in layer_config:
        if pattern.search(name):
            if override is None:
                return None
            unknown = set(override) - set(SETTING_KEYS)
            if unknown:
                raise ValueError(f"layer_config[{pattern.pattern!r}]: unknown keys {sorted(unknown)}; "
                                 f"allowed: {SETTING_KEYS}")
            return {**defaults, **override}
    if any(p.search(name) for p in skip):
        return None
    return dict(defaults)


def replace_linear_layers(
    model: nn.Module,
    format: str = "int4",
    group_size: int = 128,
    symmetric: bool | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
    layer_config: Mapping[str, Mapping[str, Any] | None] | None = None,
    scale_method: str = "mse",
    progress: bool = False,
) -> ReplacementSummary:
    """Replace ``nn.Linear`` modules and fused MoE experts of ``model`` with quantized ones, in place.

    ``skip``: regexes (``re.search`` on the qualified module name) of modules to keep dense.
    ``layer_config``: ``{regex: {"format": ..., "group_size": ..., "symmetric": ..., "scale_method": ...}}``
    overrides, or ``{regex: None}`` to keep a module dense; the first matching pattern wins and it
    takes precedence over ``skip``. Every target is validated before any module is touched, so a bad
    setting raises with the module's name and leaves the model unchanged.
    """
    defaults = {"format": format, "group_size": group_size, "symmetric": symmetric, "scale_method": scale_method}
    skip_patterns = [re.compile(p) for p in skip]
    config = [(re.compile(p), o) for p, o in (layer_config or {}).items()]

    plan: list[tuple[str, nn.Module, dict[str, Any]]] = []
    summary = ReplacementSummary()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_fused_experts(module)):
            continue
        settings = _settings_for(name, defaults, skip_patterns, config)
        if settings is None:
            summary.kept_dense.append(name)
            continue
        fmt = get_format(settings["format"])
        sym = settings["symmetric"]
        if sym is False and not fmt.supports_asymmetric:
            raise ValueError(f"{name}: format {fmt.name} has no asymmetric variant")
        in_features = module.in_features if isinstance(module, nn.Linear) else module.gate_up_proj.shape[-1]
        resolve_group_size(settings["group_size"], in_features, name)
        if not isinstance(module, nn.Linear):
            resolve_group_size(settings["group_size"], module.down_proj.shape[-1], f"{name}.down_proj")
        plan.append((name, module, settings))

    items: Iterable = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc="quantizing", unit="module")
    with torch.no_grad():
        for name, module, settings in items:
            summary.bytes_before += _param_bytes(module)
            if isinstance(module, nn.Linear):
                new = MetalQuantizedLinear.from_float(module, name=name, **settings)
            else:
                new = QuantizedExperts.from_float(module, name=name, **settings)
            summary.bytes_after += _param_bytes(new)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            summary.replaced.append(name)
    return summary


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized module of ``model`` by its dense float32 equivalent, in place (the inverse
    of ``replace_linear_layers`` up to rounding). Returns the number of modules replaced."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (MetalQuantizedLinear, QuantizedExperts))]
    for name, mod in targets:
        if isinstance(mod, MetalQuantizedLinear):
            dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                              device=mod.packed.device)
            with torch.no_grad():
                dense.weight.copy_(mod.dequantize_weight())
                if mod.bias is not None:
                    dense.bias.copy_(mod.bias)
        else:
            dense = DenseExperts(mod.gate_up_proj.dequantize_weight(), mod.down_proj.dequantize_weight(), mod.act_fn,
                                 name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    return len(targets)
