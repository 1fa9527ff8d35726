"""``metal-marlin info``: what a checkpoint or GGUF file holds, read from headers only (no weights loaded)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from safetensors import safe_open

from .checkpoint import INDEX_FILE, QUANT_CONFIG_FILE, QUANTIZED_TENSOR_SUFFIXES, read_quantization_config


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(cells))

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _checkpoint_tensor_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """``{tensor: (numel, bytes)}`` from the safetensors headers."""
    files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values())) \
        if (path / INDEX_FILE).is_file() else ["model.safetensors"]
    sizes = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                sl = f.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}[sl.get_dtype()]
                sizes[key] = (numel, numel * itemsize)
    return sizes


def describe_checkpoint(path: Path) -> str:
    qconfig = read_quantization_config(path)
    sizes = _checkpoint_tensor_sizes(path)
    groups: dict[tuple, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    quantized_bytes = 0
    tied = {name: spec["tied_to"] for name, spec in qconfig["modules"].items() if "tied_to" in spec}
    for name, spec in qconfig["modules"].items():
        if name in tied:  # its tensors are the embedding's, counted there
            continue
        if spec["kind"] == "linear":
            weights = spec["in_features"] * spec["out_features"]
        elif spec["kind"] == "embedding":
            weights = spec["num_embeddings"] * spec["embedding_dim"]
        else:
            weights = 3 * spec["num_experts"] * spec["hidden_dim"] * spec["intermediate_dim"]
        nbytes = sum(b for key, (_, b) in sizes.items() if key.startswith(name + ".")
                     and key.endswith(QUANTIZED_TENSOR_SUFFIXES))
        if spec["format"] == "trellis" and spec["kind"] == "experts":
            widths = sorted({k for bits in spec["expert_bits"].values() for k in bits})
            fmt, group, grid = f"trellis K={'/'.join(map(str, widths))}", "16x16", spec["codebook"]
        elif spec["format"] == "trellis":
            fmt, group, grid = f"trellis K={spec['bits']}", "16x16", spec["codebook"]
        else:
            fmt, group, grid = spec["format"], spec["group_size"], "sym" if spec["symmetric"] else "asym"
        row = groups[(fmt, str(group), grid, spec["kind"])]
        row[0] += 1
        row[1] += weights
        row[2] += nbytes
        quantized_bytes += nbytes
    rows = [(f, g, k, kind, n, f"{w / 1e6:.2f}M", f"{b / 2**20:.2f}", f"{8 * b / w:.3f}")
            for (f, g, k, kind), (n, w, b) in sorted(groups.items())]
    total = sum(b for _, b in sizes.values())
    dense = total - quantized_bytes
    q = qconfig["quantizer"]
    head = (f"{path}: metal-marlin checkpoint, format version {qconfig['format_version']}, quantizer "
            f"{q.get('method', '?')}\n")
    return head + _table(rows, ("format", "group", "grid", "kind", "modules", "weights", "MiB", "bits/w")) + (
        f"\ndense tensors: {dense / 2**20:.2f} MiB ({len(qconfig['dense_modules'])} linear modules kept dense: "
        f"{', '.join(qconfig['dense_modules'][:4])}{' ...' if len(qconfig['dense_modules']) > 4 else ''})"
        + "".join(f"\n{module} shares the tensors of {owner} (tied)" for module, owner in tied.items())
        + f"\ntotal: {total / 2**20:.2f} MiB")


def describe_gguf(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(str(path))
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for t in reader.tensors:
        row = groups[t.tensor_type.name]
        row[0] += 1
        row[1] += int(t.n_elements)
        row[2] += int(t.n_bytes)
    rows = [(k, n, f"{w / 1e6:.2f}M", f"{b / 2**20:.2f}", f"{8 * b / w:.3f}")
            for k, (n, w, b) in sorted(groups.items())]
    arch = reader.fields["general.architecture"].contents()
    total_w = sum(v[1] for v in groups.values())
    total_b = sum(v[2] for v in groups.values())
    return (f"{path}: GGUF, architecture {arch}\n" + _table(rows, ("type", "tensors", "weights", "MiB", "bits/w"))
            + f"\ntotal: {total_w / 1e6:.2f}M weights, {total_b / 2**20:.2f} MiB, {8 * total_b / total_w:.3f} bits/w")


def describe(path: str) -> str:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return describe_gguf(p)
    if p.is_dir() and (p / QUANT_CONFIG_FILE).is_file():
        return describe_checkpoint(p)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    raise ValueError(f"{path}: not a metal-marlin checkpoint or a GGUF file")
