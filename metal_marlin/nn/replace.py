"""``replace_linear_layers``: quantize a transformers model's linear layers and fused MoE experts in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..formats import GroupFormat, get_format, resolve_group_size
from ..formats.trellis import TILE
from .buffers import QuantizedWeightBuffers
from .embedding import QuantizedEmbedding
from .experts import DenseExperts, QuantizedExperts, TrellisExperts
from .linear import MetalQuantizedLinear
from .trellis import TrellisLinear

# Embeddings are not nn.Linear and are never touched; the output head is kept dense by default
# because it is often tied to the embedding and is the most quantization-sensitive matrix.
DEFAULT_SKIP = (r"(^|\.)lm_head$",)
SETTING_KEYS = ("format", "bits", "group_size", "symmetric", "scale_method", "codebook")
GROUP_KEYS = ("group_size", "symmetric", "scale_method")


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
            merged = {**defaults, **override}
            if "format" in override and "bits" not in override:
                merged["bits"] = None  # a different format does not inherit the default's width
            return merged
    if any(p.search(name) for p in skip):
        return None
    return dict(defaults)


def _validate(name: str, module: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    """Resolve and check one module's settings before anything is modified."""
    fmt = get_format(settings["format"], settings["bits"])
    settings = {**settings, "format": fmt.name}
    is_linear = isinstance(module, nn.Linear)
    if isinstance(fmt, GroupFormat):
        if settings["symmetric"] is False and not fmt.supports_asymmetric:
            raise ValueError(f"{name}: format {fmt.name} has no asymmetric variant")
        dims = [module.in_features] if is_linear else [module.gate_up_proj.shape[-1], module.down_proj.shape[-1]]
        for k in dims:
            resolve_group_size(settings["group_size"], k, name)
        return settings
    shapes = [(module.out_features, module.in_features)] if is_linear else \
        [tuple(module.gate_up_proj.shape[1:]), tuple(module.down_proj.shape[1:])]
    for n, k in shapes:
        if n % TILE or k % TILE:
            raise ValueError(f"{name}: trellis needs dimensions that are multiples of {TILE}, got {n}x{k}")
    return settings


def quantized_module(name: str, module: nn.Module, settings: dict[str, Any], hessian=None) -> nn.Module:
    """The quantized replacement of ``module`` (validated settings; ``hessian`` only for trellis: a
    matrix for a linear, ``{projection: [per-expert matrix or None]}`` for fused experts, whose
    ``settings["bits"]`` may also be ``{projection: [per-expert bits]}``)."""
    if settings["format"] == "trellis":
        bits = settings["bits"] or 4
        if isinstance(module, nn.Linear):
            return TrellisLinear.from_float(module, bits=bits, codebook=settings["codebook"], hessian=hessian,
                                            name=name)
        return TrellisExperts.from_float(module, bits=bits, codebook=settings["codebook"], hessians=hessian,
                                         name=name)
    group = {k: settings[k] for k in GROUP_KEYS}
    if isinstance(module, nn.Linear):
        return MetalQuantizedLinear.from_float(module, settings["format"], name=name, **group)
    return QuantizedExperts.from_float(module, settings["format"], name=name, **group)


def plan_replacement(
    model: nn.Module,
    defaults: dict[str, Any],
    skip: Iterable[str] = DEFAULT_SKIP,
    layer_config: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> tuple[list[tuple[str, nn.Module, dict[str, Any]]], list[str]]:
    """Every linear / fused-experts module with its validated settings, and the names kept dense."""
    skip_patterns = [re.compile(p) for p in skip]
    config = [(re.compile(p), o) for p, o in (layer_config or {}).items()]
    plan, dense = [], []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_fused_experts(module)):
            continue
        settings = _settings_for(name, defaults, skip_patterns, config)
        if settings is None:
            dense.append(name)
        else:
            plan.append((name, module, _validate(name, module, settings)))
    return plan, dense


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def replace_linear_layers(
    model: nn.Module,
    format: str = "int4",
    group_size: int = 128,
    symmetric: bool | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
    layer_config: Mapping[str, Mapping[str, Any] | None] | None = None,
    scale_method: str = "mse",
    bits: int | None = None,
    codebook: str = "3inst",
    progress: bool = False,
) -> ReplacementSummary:
    """Replace ``nn.Linear`` modules and fused MoE experts of ``model`` with quantized ones, in place,
    by round-to-nearest (group formats) or trellis coding without calibration (``format="trellis"``).

    ``skip``: regexes (``re.search`` on the qualified module name) of modules to keep dense.
    ``layer_config``: ``{regex: {"format": ..., "bits": ..., "group_size": ..., "symmetric": ...,
    "scale_method": ..., "codebook": ...}}`` overrides, or ``{regex: None}`` to keep a module dense; the
    first matching pattern wins and it takes precedence over ``skip``. Every target is validated before
    any module is touched, so a bad setting raises with the module's name and leaves the model unchanged.
    """
    defaults = {"format": format, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                "scale_method": scale_method, "codebook": codebook}
    plan, dense = plan_replacement(model, defaults, skip, layer_config)
    summary = ReplacementSummary(kept_dense=dense)
    items: Iterable = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc="quantizing", unit="module")
    with torch.no_grad():
        for name, module, settings in items:
            summary.bytes_before += _param_bytes(module)
            new = quantized_module(name, module, settings)
            summary.bytes_after += _param_bytes(new)
            replace_module(model, name, new)
            summary.replaced.append(name)
    return summary


QUANTIZED_MODULES = (MetalQuantizedLinear, QuantizedEmbedding, TrellisLinear, QuantizedExperts, TrellisExperts)


def quantized_submodules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The quantized modules of ``model`` by name, outermost only (not the per-expert ``TrellisLinear``
    inside a ``TrellisExperts``)."""
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(mod, QUANTIZED_MODULES):
            yield name, mod
            if isinstance(mod, TrellisExperts):
                inside.append(name + ".")


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized module of ``model`` by its dense float32 equivalent, in place (the inverse
    of ``replace_linear_layers`` up to rounding). Modules sharing one quantized weight (a tied embedding and
    output head) get one shared dense weight. Returns the number of modules replaced."""
    targets = list(quantized_submodules(model))
    dense_weights: dict[int, nn.Parameter] = {}

    def dense_weight(mod: nn.Module) -> nn.Parameter:
        key = id(mod.packed) if isinstance(mod, QuantizedWeightBuffers) else id(mod)
        if key not in dense_weights:
            dense_weights[key] = nn.Parameter(mod.dequantize_weight())
        return dense_weights[key]

    for name, mod in targets:
        if isinstance(mod, QuantizedEmbedding):
            dense = nn.Embedding(mod.num_embeddings, mod.embedding_dim, device="meta")
            dense.weight = dense_weight(mod)
        elif isinstance(mod, (MetalQuantizedLinear, TrellisLinear)):
            dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            dense.weight = dense_weight(mod)
            if mod.bias is not None:
                dense.bias = nn.Parameter(mod.bias.detach().float().clone())
        elif isinstance(mod, TrellisExperts):
            dense = DenseExperts(mod.dequantize_weight("gate_up_proj"), mod.dequantize_weight("down_proj"),
                                 mod.act_fn, name)
        else:
            dense = DenseExperts(mod.gate_up_proj.dequantize_weight(), mod.down_proj.dequantize_weight(), mod.act_fn,
                                 name)
        replace_module(model, name, dense)
    return len(targets)
