"""The metal-marlin checkpoint: a directory transformers can read, written atomically.

Layout (format version 1, specified in docs/formats.md):
  config.json                   the model's transformers config, with ``quantization_config`` embedded
  quantization_config.json      format version, defaults, every quantized module, dense modules, quantizer
  tokenizer files               as ``tokenizer.save_pretrained`` writes them
  model-0000i-of-0000n.safetensors + model.safetensors.index.json
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..formats import FORMATS
from ..nn import (
    MetalQuantizedLinear,
    QuantizedEmbedding,
    QuantizedExperts,
    TrellisExperts,
    TrellisLinear,
    is_fused_experts,
    quantized_submodules,
    replace_module,
)

FORMAT_VERSION = 1
QUANT_METHOD = "metal_marlin"
QUANT_CONFIG_FILE = "quantization_config.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 2**30
QUANTIZED_TENSOR_SUFFIXES = (".packed", ".scales", ".offsets", ".trellis", ".su", ".sv")
DEFAULT_KEYS = ("format", "bits", "group_size", "symmetric", "codebook")
MODULE_KINDS = ("linear", "experts", "embedding")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file, tensor or module."""


# -- describing a quantized model --------------------------------------------------------------------

def describe_quantized_modules(model: nn.Module) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every quantized module's settings by name, and the linear/expert modules still dense."""
    modules: dict[str, dict[str, Any]] = {}
    quantized = list(quantized_submodules(model))
    embeddings = {name: mod for name, mod in quantized if isinstance(mod, QuantizedEmbedding)}
    for name, mod in quantized:
        if isinstance(mod, QuantizedEmbedding):
            modules[name] = {"kind": "embedding", "format": mod.format, "group_size": mod.group_size,
                             "symmetric": mod.symmetric, "num_embeddings": mod.num_embeddings,
                             "embedding_dim": mod.embedding_dim}
        elif isinstance(mod, MetalQuantizedLinear):
            modules[name] = {"kind": "linear", "format": mod.format, "group_size": mod.group_size,
                             "symmetric": mod.symmetric, "in_features": mod.in_features,
                             "out_features": mod.out_features, "bias": mod.bias is not None}
            owner = next((e for e, emb in embeddings.items() if mod.shares_weight_of(emb)), None)
            if owner is not None:
                modules[name]["tied_to"] = owner
            elif mod.borrows_weight:  # Module.to() moves each module's buffers on its own, breaking the tie
                raise CheckpointError(f"{name}: its tensors belong to a tied embedding but are no longer shared "
                                      "with it (moved with .to()?); call share_weight again before saving")
        elif isinstance(mod, TrellisLinear):
            modules[name] = {"kind": "linear", "format": "trellis", "bits": mod.bits, "codebook": mod.codebook,
                             "had_in": mod.had_in, "had_out": mod.had_out, "in_features": mod.in_features,
                             "out_features": mod.out_features, "bias": mod.bias is not None}
        elif isinstance(mod, QuantizedExperts):
            part = mod.gate_up_proj
            modules[name] = {"kind": "experts", "format": part.format, "group_size": part.group_size,
                             "symmetric": part.symmetric, "num_experts": mod.num_experts,
                             "hidden_dim": mod.hidden_dim, "intermediate_dim": mod.intermediate_dim}
        elif isinstance(mod, TrellisExperts):
            modules[name] = {"kind": "experts", "format": "trellis", "codebook": mod.codebook,
                             "num_experts": mod.num_experts, "hidden_dim": mod.hidden_dim,
                             "intermediate_dim": mod.intermediate_dim, "expert_bits": mod.bits,
                             "hadamard_blocks": {p: list(b) for p, b in mod.hadamard_blocks.items()}}
    dense = [name for name, mod in model.named_modules()
             if (isinstance(mod, nn.Linear) or is_fused_experts(mod)) and name not in modules]
    return modules, dense


def build_quantization_config(model: nn.Module, quantizer: Mapping[str, Any] | None = None) -> dict[str, Any]:
    modules, dense = describe_quantized_modules(model)
    if not modules:
        raise CheckpointError("the model has no quantized modules (run replace_linear_layers or a quantizer first)")
    common = collections.Counter(tuple((k, m[k]) for k in DEFAULT_KEYS if k in m) for m in modules.values())
    default = dict(common.most_common(1)[0][0])
    default.setdefault("bits", FORMATS[default["format"]].bits)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "default": default,
        "modules": modules,
        "dense_modules": dense,
        "quantizer": dict(quantizer or {"method": "rtn"}),
    }


def validate_quantization_config(qconfig: Mapping[str, Any], source: str) -> None:
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{source}: quant_method is {qconfig.get('quant_method')!r}, not {QUANT_METHOD!r}")
    version = qconfig.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: unknown checkpoint format version {version!r} "
                              f"(this metal-marlin reads version {FORMAT_VERSION})")
    modules = qconfig.get("modules", {})
    for name, spec in modules.items():
        if spec.get("kind") not in MODULE_KINDS:
            raise CheckpointError(f"{source}: module {name!r} has unknown kind {spec.get('kind')!r}")
        if spec.get("format") not in FORMATS:
            raise CheckpointError(f"{source}: module {name!r} has unknown format {spec.get('format')!r}")
        owner = spec.get("tied_to")
        if owner is not None and modules.get(owner, {}).get("kind") != "embedding":
            raise CheckpointError(f"{source}: module {name!r} is tied to {owner!r}, which is not a quantized "
                                  "embedding of this checkpoint")


def install_tied_head(model: nn.Module, head: str, embedding: str) -> None:
    """Make ``head`` the output head reading the ``QuantizedEmbedding`` at ``embedding`` (one copy of the
    table). transformers' tie of the two modules' ``weight`` parameters is dropped: neither has one."""
    replace_module(model, head, model.get_submodule(embedding).tied_linear(head))
    prefixes = (f"{head}.", f"{embedding}.")
    for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
        ties = getattr(model, attr, None)
        if ties:
            setattr(model, attr, {target: source for target, source in ties.items()
                                  if not (target.startswith(prefixes) or source.startswith(prefixes))})


def share_tied_weights(model: nn.Module, qconfig: Mapping[str, Any]) -> None:
    """Point every tied head at its embedding's tensors again, after a loader assigned the embedding new ones."""
    for name, spec in qconfig["modules"].items():
        if "tied_to" in spec:
            model.get_submodule(name).share_weight(model.get_submodule(spec["tied_to"]))


def install_quantized_modules(model: nn.Module, qconfig: Mapping[str, Any], device: torch.device | str) -> None:
    """Replace the modules named in ``qconfig`` by empty quantized modules of the recorded layout (a tied
    head after the embedding whose tensors it shares)."""
    for name, spec in sorted(qconfig["modules"].items(), key=lambda item: "tied_to" in item[1]):
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"quantized module {name!r} does not exist in this model") from err
        if "tied_to" in spec:
            install_tied_head(model, name, spec["tied_to"])
            continue
        if spec["kind"] == "embedding":
            new = QuantizedEmbedding(spec["num_embeddings"], spec["embedding_dim"], format=spec["format"],
                                     group_size=spec["group_size"], symmetric=spec["symmetric"],
                                     dtype=old.weight.dtype, device=device, name=name)
        elif spec["format"] == "trellis" and spec["kind"] == "experts":
            new = TrellisExperts(spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"], old.act_fn,
                                 spec["expert_bits"], spec["codebook"],
                                 {p: tuple(b) for p, b in spec["hadamard_blocks"].items()}, device, name)
        elif spec["format"] == "trellis":
            new = TrellisLinear(spec["in_features"], spec["out_features"], bias=spec["bias"], bits=spec["bits"],
                                codebook=spec["codebook"], had_in=spec["had_in"], had_out=spec["had_out"],
                                device=device, name=name)
        elif spec["kind"] == "linear":
            new = MetalQuantizedLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                                       format=spec["format"], group_size=spec["group_size"],
                                       symmetric=spec["symmetric"], device=device, name=name)
        else:
            new = QuantizedExperts(spec["num_experts"], spec["hidden_dim"], spec["intermediate_dim"], old.act_fn,
                                   format=spec["format"], group_size=spec["group_size"],
                                   symmetric=spec["symmetric"], device=device, name=name)
        replace_module(model, name, new)


# -- writing -----------------------------------------------------------------------------------------

def _is_checkpoint_dir(path: Path) -> bool:
    return any((path / f).exists() for f in (QUANT_CONFIG_FILE, "config.json", INDEX_FILE, "model.safetensors"))


def _unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that alias an earlier one (tied embeddings): safetensors stores each storage once."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = t.detach().contiguous().cpu()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({key: file for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path that holds a checkpoint (unless ``overwrite``) or any other content."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: exists and is not a directory")
        if _is_checkpoint_dir(path):
            if not overwrite:
                raise CheckpointError(f"{path}: already holds a checkpoint (pass overwrite=True / --overwrite)")
        elif any(path.iterdir()):
            raise CheckpointError(f"{path}: is a non-empty directory that is not a checkpoint; refusing to replace it")
    return path


def save_quantized(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    quantizer: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``model`` (a transformers model with quantized modules) as a checkpoint directory.

    The checkpoint is written to a temporary directory beside ``path`` and renamed into place, so
    an interrupted save never leaves a partial checkpoint at ``path``. An existing checkpoint at
    ``path`` is refused unless ``overwrite``; a non-empty directory that is not a checkpoint is
    always refused.
    """
    path = check_output_dir(path, overwrite)
    qconfig = build_quantization_config(model, quantizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config = model.config.to_dict()
        config["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (tmp / QUANT_CONFIG_FILE).write_text(json.dumps(qconfig, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_shards(_unique_tensors(model.state_dict()), tmp, max_shard_bytes)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- reading -----------------------------------------------------------------------------------------

def read_quantization_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / QUANT_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path}: no {QUANT_CONFIG_FILE}; not a metal-marlin checkpoint")
    try:
        qconfig = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    validate_quantization_config(qconfig, str(file))
    return qconfig


def read_checkpoint_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, read through safetensors' memory map, with clear errors."""
    path = Path(path)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no {INDEX_FILE} or model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        shard = path / file
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(shard), framework="pt", device=device) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{shard}: unreadable or truncated safetensors file ({err})") from err
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in {INDEX_FILE} are missing from their shards: "
                                  f"{', '.join(missing[:5])}")
    return tensors


def materialize_non_persistent_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Buffers not saved in checkpoints (rotary ``inv_freq``) are recomputed by transformers' init."""
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)) and not any(
                p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)


def load_state_strict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into a meta-initialised model: every tensor must exist with the right shape, and
    every model tensor must be loaded (tied weights excepted)."""
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: tensors that do not belong to the model: {', '.join(unexpected[:5])}")
    for key, t in tensors.items():
        want = expected[key]
        if tuple(t.shape) != tuple(want.shape) or (t.dtype != want.dtype and not want.is_floating_point()):
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(t.shape)} {t.dtype}, "
                                  f"the model expects {tuple(want.shape)} {want.dtype}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(k for k, v in model.state_dict().items() if v.is_meta)
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def load_transformers_checkpoint(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load a metal-marlin checkpoint as a transformers model carrying our quantized modules: returns
    ``(model, tokenizer)`` (tokenizer None if not saved). ``load_quantized_model`` wraps it in our runtime."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    qconfig = read_quantization_config(path)
    tensors = read_checkpoint_tensors(path, device)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    install_quantized_modules(model, qconfig, "meta")
    if dtype is not None:
        # Dense weights follow the requested dtype; quantized tensors keep their stored layout.
        tensors = {k: v if k.endswith(QUANTIZED_TENSOR_SUFFIXES) or not v.is_floating_point() else v.to(dtype)
                   for k, v in tensors.items()}
    load_state_strict(model, tensors, str(path))
    share_tied_weights(model, qconfig)
    materialize_non_persistent_buffers(model, device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer
