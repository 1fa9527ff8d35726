"""Perplexity of the embedded SmolLM2-135M-Instruct under each format (reference method, docs/perplexity.md).

Every row starts from the same fp32 weights: the Q4_1 GGUF dequantized. "int4 asym g32" should equal
fp32, because the GGUF's weights already lie on that grid. Prints a markdown table.

Usage: python benchmarks/perplexity.py [--max-tokens 8192] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from metal_marlin.eval import load_corpus, perplexity
from metal_marlin.models.loading import embedded_model_path, load_transformers_model
from metal_marlin.models.quantize import CalibrationSettings, quantize_model
from metal_marlin.nn import dequantize_model, replace_linear_layers

# (name, method, settings); method "rtn" needs no calibration, "gptq" / "ldlq" calibrate on the default
# corpus after its first 8192 tokens (disjoint from the evaluated slice).
ROWS = [
    ("fp32 (dequantized GGUF)", None, {}),
    ("int8 g32", "rtn", dict(format="int8", group_size=32)),
    ("int4 asym g32", "rtn", dict(format="int4", group_size=32, symmetric=False)),
    ("int4 asym g128", "rtn", dict(format="int4", group_size=128, symmetric=False)),
    ("int4 sym g128", "rtn", dict(format="int4", group_size=128, symmetric=True)),
    ("fp4 g32", "rtn", dict(format="fp4", group_size=32)),
    ("int3 asym g128", "rtn", dict(format="int3", group_size=128, symmetric=False)),
    ("int3 asym g32", "rtn", dict(format="int3", group_size=32, symmetric=False)),
    ("int2 asym g128", "rtn", dict(format="int2", group_size=128, symmetric=False)),
    ("int2 asym g32", "rtn", dict(format="int2", group_size=32, symmetric=False)),
    ("GPTQ int4 asym g128", "gptq", dict(format="int4", group_size=128, symmetric=False)),
    ("GPTQ int4 asym g32", "gptq", dict(format="int4", group_size=32, symmetric=False)),
    ("GPTQ int3 asym g128", "gptq", dict(format="int3", group_size=128, symmetric=False)),
    ("GPTQ int3 asym g32", "gptq", dict(format="int3", group_size=32, symmetric=False)),
    ("GPTQ int2 asym g128", "gptq", dict(format="int2", group_size=128, symmetric=False)),
    ("GPTQ int2 asym g32", "gptq", dict(format="int2", group_size=32, symmetric=False)),
    ("trellis K=4 (no calibration)", "rtn", dict(format="trellis", bits=4)),
    ("trellis K=4 LDLQ", "ldlq", dict(format="trellis", bits=4)),
    ("trellis K=3 LDLQ", "ldlq", dict(format="trellis", bits=3)),
    ("trellis K=2 LDLQ", "ldlq", dict(format="trellis", bits=2)),
    ("trellis --bpw 3.5 LDLQ", "ldlq", dict(format="trellis", bpw=3.5)),
    ("trellis --bpw 2.5 LDLQ", "ldlq", dict(format="trellis", bpw=2.5)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences of 512 tokens")
    parser.add_argument("--only", nargs="+", default=None, help="run the rows whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_transformers_model(str(embedded_model_path()))
    dequantize_model(model)
    text = load_corpus()
    print(f"SmolLM2-135M-Instruct, first {args.max_tokens} tokens of lee_background.cor, seq {args.seq_len}, "
          f"{args.threads} threads\n")
    print("| weights (linear layers; embeddings/lm_head fp32) | bits/weight | perplexity | quantize s | eval s |")
    print("|---|---:|---:|---:|---:|")
    for name, method, settings in ROWS:
        if args.only is not None and not any(text in name for text in args.only):
            continue
        candidate = copy.deepcopy(model)
        bits = 32.0
        start = time.perf_counter()
        if method == "rtn":
            summary = replace_linear_layers(candidate, **settings)
        elif method is not None:
            calibration = CalibrationSettings(n_samples=args.samples, seq_len=512)
            summary = quantize_model(candidate, tokenizer, calibration=calibration, **settings)
        if method is not None:
            bits = 8 * summary.bytes_after / (summary.bytes_before / 4)
        quantize_s = time.perf_counter() - start
        start = time.perf_counter()
        result = perplexity(candidate, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
        print(f"| {name} | {bits:.2f} | {result.perplexity:.3f} | {quantize_s:.0f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
