"""Decode and prefill speed of TrellisForCausalLM against transformers on the embedded SmolLM2-135M, plus
the MLA latent cache's size against a per-head cache for the GLM-4.7-Flash configuration.

Rows: our runtime with the GGUF's int4 g32 weights (imported without requantization), with trellis K=4
and K=3, and with fp32 weights; transformers (its own model code, fp32 dequantized weights). The trellis
rows use random trellis codes: decode cost does not depend on the code values, and a real encode of
the model takes minutes (docs/quality.md has the quality of real encodes). Runs alternate between
rows; each number is the median (min-max) over ``--runs`` runs.

Decode tok/s = (N - 1) / (time of generating N tokens - time of generating 1) after a 32-token prompt;
prefill tok/s = prompt tokens / time of one forward over a ``--prefill`` token prompt.

Usage: python benchmarks/runtime.py [--runs 5] [--decode 64] [--prefill 256] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from metal_marlin.formats.hadamard import hadamard_block_size
from metal_marlin.models import TrellisForCausalLM, load_transformers_model
from metal_marlin.models.cache import KVCache, MLACache
from metal_marlin.nn import MetalQuantizedLinear, TrellisLinear, dequantize_model, replace_module


def random_trellis(model: nn.Module, bits: int, seed: int = 0) -> nn.Module:
    """``model`` with every quantized linear replaced by a trellis linear holding random codes."""
    gen = torch.Generator().manual_seed(seed)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MetalQuantizedLinear) and not mod.borrows_weight:  # a tied head keeps the embedding's
            new = TrellisLinear(mod.in_features, mod.out_features, bias=False, bits=bits, name=name,
                                had_in=hadamard_block_size(mod.in_features),
                                had_out=hadamard_block_size(mod.out_features))
            new.trellis.copy_(torch.randint(-2**31, 2**31 - 1, new.trellis.shape, generator=gen, dtype=torch.int32))
            signs = lambda n: (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).half()  # noqa: E731
            new.su.copy_(signs(mod.in_features))
            new.sv.copy_(signs(mod.out_features) * 0.02)
            replace_module(model, name, new)
    return model


def time_ours(model: TrellisForCausalLM, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, stop_token_ids=[])
    return time.perf_counter() - start


def time_transformers(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    return time.perf_counter() - start


def time_prefill(model: nn.Module, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(prompt)
        _ = out if isinstance(out, torch.Tensor) else out.logits
    return time.perf_counter() - start


def mla_cache_table() -> str:
    """GLM-4.7-Flash: 47 layers, 20 heads, kv_lora_rank 512, rope 64, nope 192, v 256 (its config.json)."""
    layers, heads, rank, rope, nope, v = 47, 20, 512, 64, 192, 256
    latent = MLACache(layers, 1, 1, rank, rope, torch.bfloat16, "meta").bytes_per_token()
    per_head = KVCache(layers, 1, 1, heads, nope + rope, v, torch.bfloat16, "meta").bytes_per_token()
    return ("| GLM-4.7-Flash KV cache (bf16) | bytes per token | KiB per 4096-token context |\n|---|---:|---:|\n"
            f"| MLA latent (rank {rank} + rope {rope}) x {layers} layers | {latent} | {latent * 4096 / 1024:.0f} |\n"
            f"| per-head keys ({heads}x{nope + rope}) + values ({heads}x{v}) | {per_head} | "
            f"{per_head * 4096 / 1024:.0f} |\n| ratio | {per_head / latent:.1f}x | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--decode", type=int, default=64, help="tokens generated per decode run")
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens of a prefill run")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    hf, tokenizer = load_transformers_model(None)
    dense = copy.deepcopy(hf)
    dequantize_model(dense)
    rows = {
        "ours int4 g32 (GGUF Q4_1)": ("ours", TrellisForCausalLM.from_hf_model(copy.deepcopy(hf))),
        "ours trellis K=4": ("ours", TrellisForCausalLM.from_hf_model(random_trellis(copy.deepcopy(hf), 4))),
        "ours trellis K=3": ("ours", TrellisForCausalLM.from_hf_model(random_trellis(copy.deepcopy(hf), 3))),
        "ours fp32": ("ours", TrellisForCausalLM.from_hf_model(copy.deepcopy(dense))),
        "transformers fp32": ("hf", dense),
    }
    text = "The quick brown fox jumps over the lazy dog. " * 200
    ids = tokenizer(text, return_tensors="pt").input_ids
    prompt, long_prompt = ids[:, :32], ids[:, :args.prefill]
    print(f"SmolLM2-135M-Instruct; decode after a 32-token prompt ({args.decode} tokens), prefill of "
          f"{args.prefill} tokens; median (min-max) of {args.runs} alternating runs\n")
    print("| weights / runtime | threads | decode tok/s | vs transformers | prefill tok/s | vs transformers |")
    print("|---|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        decode = {name: [] for name in rows}
        prefill = {name: [] for name in rows}
        for run in range(args.runs + 1):  # run 0 warms up
            for name, (kind, model) in rows.items():
                timer = time_ours if kind == "ours" else time_transformers
                full, one = timer(model, prompt, args.decode), timer(model, prompt, 1)
                pre = time_prefill(model, long_prompt)
                if run:
                    decode[name].append((args.decode - 1) / (full - one))
                    prefill[name].append(args.prefill / pre)
        base_d = statistics.median(decode["transformers fp32"])
        base_p = statistics.median(prefill["transformers fp32"])
        for name in rows:
            d, p = decode[name], prefill[name]
            print(f"| {name} | {threads} | {statistics.median(d):.1f} ({min(d):.1f}-{max(d):.1f}) | "
                  f"{statistics.median(d) / base_d:.2f}x | {statistics.median(p):.0f} ({min(p):.0f}-{max(p):.0f}) | "
                  f"{statistics.median(p) / base_p:.2f}x |", flush=True)
    print()
    print(mla_cache_table())


if __name__ == "__main__":
    main()
