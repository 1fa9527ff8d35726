"""The README's main job: import the embedded SmolLM2 GGUF, requantize it, compare perplexity, generate."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from .eval import load_corpus, perplexity
from .models import TrellisForCausalLM
from .models.loading import embedded_model_path, load_transformers_model
from .nn import dequantize_model, replace_linear_layers

DEMO_FORMATS = (("int8", 32), ("int4", 128), ("fp4", 32), ("int3", 32))
PROMPT = "The capital of France is"


def run_demo(max_tokens: int = 2048, print_fn: Callable[[str], None] = print) -> list[tuple[str, float, float]]:
    """Returns ``(name, bits per weight, perplexity)`` rows, printing progress and a table."""
    path = embedded_model_path()
    start = time.perf_counter()
    gguf_model, tokenizer = load_transformers_model(str(path))
    print_fn(f"imported {path.name} in {time.perf_counter() - start:.1f} s (Q4_1 -> int4 asym g32, no requantization)")
    text = load_corpus()
    dense = copy.deepcopy(gguf_model)
    dequantize_model(dense)
    requantized = []
    for fmt, group in DEMO_FORMATS:
        model = copy.deepcopy(dense)
        summary = replace_linear_layers(model, format=fmt, group_size=group)
        requantized.append((f"{fmt} g{group}", model, 8 * summary.bytes_after / (summary.bytes_before / 4)))
    # every variant runs on our runtime (from_hf_model takes the transformers model's modules over)
    models = [(name, TrellisForCausalLM.from_hf_model(model), bits) for name, model, bits in
              [("gguf Q4_1 as int4-asym g32", gguf_model, 5.0), ("fp32 (dequantized)", dense, 32.0), *requantized]]
    rows = []
    print_fn(f"\nperplexity on the first {max_tokens} tokens of the default corpus (seq 512):")
    print_fn(f"{'model':<28}{'bits/w':>8}{'ppl':>10}{'s':>7}")
    for name, model, bits in models:
        start = time.perf_counter()
        ppl = perplexity(model, tokenizer, text, max_tokens=max_tokens).perplexity
        print_fn(f"{name:<28}{bits:>8.2f}{ppl:>10.3f}{time.perf_counter() - start:>7.1f}")
        rows.append((name, bits, ppl))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = models[0][1].generate(ids, max_new_tokens=16)
    print_fn(f"\ngreedy, imported model (our runtime): {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    return rows


