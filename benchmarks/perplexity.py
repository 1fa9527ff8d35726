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
from metal_marlin.models.loading import embedded_model_path, load_model
from metal_marlin.nn import dequantize_model, replace_linear_layers

ROWS = [
    ("fp32 (dequantized GGUF)", None, None, None),
    ("int8 g32", "int8", 32, None),
    ("int4 asym g32", "int4", 32, False),
    ("int4 asym g128", "int4", 128, False),
    ("int4 sym g128", "int4", 128, True),
    ("fp4 g32", "fp4", 32, None),
    ("int3 asym g32", "int3", 32, False),
    ("int2 asym g32", "int2", 32, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(embedded_model_path()))
    dequantize_model(model)
    text = load_corpus()
    print(f"SmolLM2-135M-Instruct, first {args.max_tokens} tokens of lee_background.cor, seq {args.seq_len}, "
          f"{args.threads} threads\n")
    print("| weights (linear layers; embeddings/lm_head fp32) | bits/weight | perplexity | eval s |")
    print("|---|---:|---:|---:|")
    for name, fmt, group, symmetric in ROWS:
        candidate = copy.deepcopy(model)
        bits = 32.0
        if fmt is not None:
            summary = replace_linear_layers(candidate, format=fmt, group_size=group, symmetric=symmetric)
            bits = 8 * summary.bytes_after / (summary.bytes_before / 4)
        start = time.perf_counter()
        result = perplexity(candidate, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens)
        print(f"| {name} | {bits:.2f} | {result.perplexity:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
