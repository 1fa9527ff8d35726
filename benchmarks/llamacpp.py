"""CPU decode and prefill of TrellisForCausalLM against llama.cpp (through llama-cpp-python) on the embedded
SmolLM2-135M-Instruct Q4_1 GGUF, with the share of the memory-bandwidth ceiling each one reaches.

Engines (one subprocess per engine and run, runs alternating between engines; 1 and 2 threads):
  ours int4 g32        the GGUF's Q4_1 matrices imported without requantization (``MetalQuantizedLinear``);
                       the tied Q8_0 embedding kept as int8 g32, shared by the lookup and the output head;
                       decode steps run fused in C++ (``_core.DecoderStack``)
  llama.cpp Q4_1       the same GGUF file
  llama.cpp Q4_0       a requantization of it by ``llama_model_quantize`` (cached under build/llamacpp/)
  ours trellis K=4, 3  every quantized matrix replaced by a trellis layer holding RANDOM codes of the right
                       shapes (decode cost does not depend on the codes; a real encode takes ~10 min per width)

Measured in each child process, after a warm-up (one full prefill and a few decode steps):
  decode tok/s   128 greedy decode steps after a 32-token prompt (the prompt's prefill not timed); each step
                 is one forward of one token plus the argmax
  prefill tok/s  one forward over a 512-token prompt (pp512), logits of the last position only
  peak RSS       VmHWM of the child (includes loading; llama.cpp maps the GGUF, which counts); RSS at end:
                 VmRSS after the measurements
Every engine gets the same token ids (the GGUF tokenizer's encoding of one text) and the same thread count
(``torch.set_num_threads``; llama's ``n_threads`` and ``n_threads_batch``).

Bandwidth ceiling: ``_core.read_bandwidth_probe`` on a 1 GiB buffer at 1 and 2 threads gives the streaming
read bandwidth. Bytes read per decoded token = every weight tensor of the engine once (quantized matrices
with their scales/offsets, norms, the output head), plus one row of the token embedding; the KV cache
(at most 160 positions x 30 layers x 2 x 192 values, under 1% of the weights) and activations are
left out. ``% ceiling`` = decode tok/s x bytes per token / read bandwidth. The host's 480 MiB L3 can hold
a whole model of this size, so a share above 100% is possible; the DRAM figure is still the bound a
larger model meets.

llama-cpp-python is a benchmark-only extra (``bench`` in pyproject.toml). It builds llama.cpp from source.
On this machine (its CPU reports AMX) the default build (``GGML_NATIVE=ON``, i.e. ``-march=native``)
compiles ggml's AMX matmul, which crashes (SIGSEGV in ``ggml_backend_amx_mul_mat``) on the first
multi-token batch. Build it with the same ISA minus AMX (about 10 minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF" \
      pip install --no-cache-dir llama-cpp-python==0.3.36

It keeps OpenMP, llamafile's sgemm and the CPU repack of Q4_0 into interleaved rows.

Usage: python benchmarks/llamacpp.py [--runs 5] [--threads 1 2] [--decode 128] [--prefill 512]
       python benchmarks/llamacpp.py --profile [--threads 1]   (where one decode step of ours spends its time)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from metal_marlin.models import TrellisForCausalLM
from metal_marlin.models.gguf import build_model_from_gguf, read_gguf
from metal_marlin.models.loading import embedded_model_path

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR.parent / "build" / "llamacpp"
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog. " * 200
PROMPT_LEN = 32

# engine id -> table label; the order is the order runs alternate in
ENGINES = {
    "ours-int4": "ours int4 g32 (GGUF Q4_1 imported)",
    "llama-q4_1": "llama.cpp Q4_1",
    "llama-q4_0": "llama.cpp Q4_0 (requantized)",
    "ours-trellis4": "ours trellis K=4 (random codes)",
    "ours-trellis3": "ours trellis K=3 (random codes)",
}
REFERENCE = "llama-q4_1"


# -- the engines (run inside a child process) ------------------------------------------------------------

def build_ours(engine: str) -> TrellisForCausalLM:
    hf = build_model_from_gguf(read_gguf(str(embedded_model_path())))
    if engine.startswith("ours-trellis"):
        sys.path.insert(0, str(BENCH_DIR))
        from runtime import random_trellis  # the benchmark's random-code trellis builder

        hf = random_trellis(hf, int(engine.removeprefix("ours-trellis")))
    return TrellisForCausalLM.from_hf_model(hf)


def ours_bytes_per_token(model: TrellisForCausalLM) -> int:
    """Every parameter and buffer once (tied tensors once), the token embedding as one row unless it is
    also the output head."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    total = sum(t.nbytes for t in tensors.values())
    embed_tensors = list(model.model.embed_tokens.buffers()) or list(model.model.embed_tokens.parameters())
    embed = sum(t.nbytes for t in embed_tensors)
    row = embed // model.config.vocab_size
    head = {t.data_ptr() for t in (*model.lm_head.parameters(), *model.lm_head.buffers())}
    tied = bool(head) and head <= {t.data_ptr() for t in embed_tensors}
    return total + row if tied else total - embed + row


def gguf_bytes_per_token(path: Path) -> int:
    """Every tensor of the file once, the token embedding as one row unless the file has no separate
    output head (then it is read whole as the head, plus the row)."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embed = tensors["token_embd.weight"]
    row = int(embed.n_bytes) // int(embed.shape[1])  # GGUF shapes list the row length first
    return total + row if "output.weight" not in tensors else total - int(embed.n_bytes) + row


def measure(time_decode: Callable[[int], tuple[float, list[int]]], time_prefill: Callable[[], float], decode: int,
            prefill_tokens: int, bytes_per_token: int) -> dict:
    """The protocol every engine follows: one warm-up of each, then timed decode and prefill."""
    time_prefill()
    time_decode(8)
    seconds, tokens = time_decode(decode)
    return {"decode_tps": decode / seconds, "prefill_tps": prefill_tokens / time_prefill(), "tokens": tokens,
            "bytes_per_token": bytes_per_token}


def run_ours(engine: str, threads: int, prompt: list[int], long_prompt: list[int], decode: int) -> dict:
    torch.set_num_threads(threads)
    model = build_ours(engine)
    short, long = torch.tensor([prompt]), torch.tensor([long_prompt])

    def time_decode(steps: int) -> tuple[float, list[int]]:
        stream = model.generate_stream(short, max_new_tokens=steps + 1, stop_token_ids=[])
        tokens = [int(next(stream))]  # the prompt's prefill and the first token: not timed
        start = time.perf_counter()
        tokens += [int(t) for t in stream]
        return time.perf_counter() - start, tokens

    def time_prefill() -> float:
        with torch.inference_mode():
            cache = model.new_cache(1, long.shape[1])
            start = time.perf_counter()
            model(long, cache=cache, logits_to_keep=1)
            return time.perf_counter() - start

    return measure(time_decode, time_prefill, decode, len(long_prompt), ours_bytes_per_token(model))


def run_llama(path: Path, threads: int, prompt: list[int], long_prompt: list[int], decode: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=0, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())

    def time_decode(steps: int) -> tuple[float, list[int]]:
        llm.reset()
        llm.eval(prompt)
        tokens = [greedy()]
        start = time.perf_counter()
        for _ in range(steps):
            llm.eval(tokens[-1:])
            tokens.append(greedy())
        return time.perf_counter() - start, tokens

    def time_prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        return time.perf_counter() - start

    return measure(time_decode, time_prefill, decode, len(long_prompt), gguf_bytes_per_token(path))


def child_main(args: argparse.Namespace) -> None:
    ids = json.loads(Path(args.prompt_file).read_text())
    prompt, long_prompt = ids[:PROMPT_LEN], ids[:args.prefill]
    if args.child.startswith("ours"):
        result = run_ours(args.child, args.threads[0], prompt, long_prompt, args.decode)
    else:
        result = run_llama(Path(args.gguf), args.threads[0], prompt, long_prompt, args.decode)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child would report its parent's peak
    status = Path("/proc/self/status").read_text()
    result["peak_rss_mb"], result["end_rss_mb"] = (int(status.split(key)[1].split()[0]) / 1024
                                                   for key in ("VmHWM:", "VmRSS:"))
    print(json.dumps(result))


# -- the profile of one decode step of ours ---------------------------------------------------------------

PHASES = ("q/k/v GEMV", "attention (norms, RoPE, cache write, softmax)", "o_proj GEMV + residual",
          "gate/up GEMV + SiLU", "down_proj GEMV + residual")
PHASE_MATRICES = (("q_proj", "k_proj", "v_proj"), (), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def profile_main(threads: int, bandwidth: float, prompt: list[int], steps: int = 64) -> None:
    """One decode step of ours int4 taken apart: the same work as ``forward`` + greedy sampling, each part
    timed, the fused layers per phase (``DecoderStack.decode``'s phase timings)."""
    torch.set_num_threads(threads)
    model = build_ours("ours-int4")
    stream = model.generate_stream(torch.tensor([prompt]), max_new_tokens=1 + 8 + steps, stop_token_ids=[])
    for _ in range(9):  # prefill and warm-up
        next(stream)
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    wall = (time.perf_counter() - start) / steps

    parts: dict[str, float] = defaultdict(float)
    phases = torch.zeros(len(PHASES), dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.bool)
    scaling = model.model.layers[0].self_attn.scaling
    with torch.inference_mode():
        cache = model.new_cache(1, len(prompt) + steps + 8)
        logits = model(torch.tensor([prompt]), cache=cache, logits_to_keep=1)[:, -1]
        stack = model._decoder_stack_for(cache)
        for step in range(steps + 8):
            if step == 8:  # warm-up done
                parts.clear()
                phases.zero_()
            t0 = time.perf_counter()
            token = logits.argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            begin, positions = cache.begin(one)
            x = model.model.embed_tokens(token)
            cos, sin = (t.reshape(1, -1).contiguous() for t in model.model.rotary(positions, x.dtype))
            hidden = x.reshape(1, -1).contiguous()
            t2 = time.perf_counter()
            stack.decode(hidden, cos, sin, cache.keys, cache.values, torch.tensor([begin], dtype=torch.int32),
                         key_mask=cache.key_mask, scaling=scaling, n_threads=threads, phase_seconds=phases)
            t3 = time.perf_counter()
            cache.end(one)
            normed = model.model.norm(hidden.view(1, 1, -1))
            t4 = time.perf_counter()
            logits = model.lm_head(normed)[:, -1]
            t5 = time.perf_counter()
            parts["greedy sampling (argmax)"] += t1 - t0
            parts["embedding lookup, RoPE tables, cache bookkeeping"] += t2 - t1
            parts["fused layers"] += t3 - t2
            parts["final RMSNorm"] += t4 - t3
            parts["lm_head (int8 g32 GEMV, tied to the Q8_0 embedding)"] += t5 - t4

    layers = model.model.layers
    def matrix_bytes(names: tuple[str, ...]) -> int:
        mods = [getattr(getattr(layer, "self_attn" if n[0] in "qkvo" else "mlp"), n) for layer in layers for n in names]
        return sum(t.nbytes for m in mods for t in (m.packed, m.scales, m.offsets) if t is not None)

    head = model.lm_head
    head_bytes = sum(t.nbytes for t in (head.packed, head.scales, head.offsets) if t is not None)
    print(f"ours int4 g32, {threads} thread(s), {steps} decode steps at positions {len(prompt)}-"
          f"{len(prompt) + steps}: {wall * 1e6:.0f} us per step in generate ({1 / wall:.1f} tok/s)\n")
    print(f"| part of one decode step | us per token | share | weight MB read | GB/s (read bandwidth "
          f"{bandwidth / 1e9:.1f}) |\n|---|---:|---:|---:|---:|")
    fused = parts.pop("fused layers")
    rows = list(parts.items())
    rows[2:2] = [(f"fused layers: {name}", float(phases[i])) for i, name in enumerate(PHASES)]
    rows.insert(2 + len(PHASES), ("fused layers: between phases (per-layer RMSNorm, GEMV input preparation)",
                                  fused - float(phases.sum())))
    for name, seconds in rows:
        per_token = seconds / steps
        nbytes = 0
        if name.startswith("fused layers: ") and name.removeprefix("fused layers: ") in PHASES:
            nbytes = matrix_bytes(PHASE_MATRICES[PHASES.index(name.removeprefix("fused layers: "))])
        elif name.startswith("lm_head"):
            nbytes = head_bytes
        rate = f"{nbytes / per_token / 1e9:.1f}" if nbytes else ""
        mb = f"{nbytes / 1e6:.1f}" if nbytes else ""
        print(f"| {name} | {per_token * 1e6:.0f} | {100 * per_token / wall:.0f}% | {mb} | {rate} |")
    measured = sum(seconds for _, seconds in rows) / steps
    # The generate step and the parts are timed in separate loops: on a noisy machine the difference
    # can come out below zero, which only says it is smaller than the noise.
    rest = wall - measured
    shown = f"{rest * 1e6:.0f} | {100 * rest / wall:.0f}%" if rest > 0 else "below the noise | "
    print(f"| generate loop around the step (Python, stop checks) | {shown} | | |")


def q4_0_requantization(source: Path) -> Path:
    """``source`` requantized to Q4_0 by llama.cpp's own quantizer (its default type choices for the
    other tensors), cached under build/llamacpp/."""
    import llama_cpp

    out = CACHE_DIR / (source.name.removesuffix(".Q4_1.gguf") + ".Q4_0.gguf")
    if not out.is_file():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            partial = Path(tmp) / out.name
            if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed on {source}")
            partial.rename(out)
    return out


def tensor_types(path: Path) -> str:
    import gguf

    counts: dict[str, int] = defaultdict(int)
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] += 1
        if t.name == "token_embd.weight":
            head = t.tensor_type.name
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f"; token_embd (tied output head) {head}"


def read_bandwidth(threads: int) -> float:
    sys.path.insert(0, str(BENCH_DIR))
    from gemv import read_bandwidth as probe  # _core.read_bandwidth_probe on 1 GiB, median of >= 5 reads

    return probe(threads)


def run_child(engine: str, threads: int, args: argparse.Namespace, prompt_file: Path, ggufs: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--threads", str(threads), "--decode", str(args.decode),
           "--prefill", str(args.prefill), "--prompt-file", str(prompt_file)]
    if engine in ggufs:
        cmd += ["--gguf", str(ggufs[engine])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} at {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids(length: int) -> list[int]:
    """The benchmark text encoded by the tokenizer stored in the embedded GGUF."""
    from transformers import AutoTokenizer

    source = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    return tokenizer(PROMPT_TEXT).input_ids[:length]


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode", type=int, default=128, help="greedy decode steps after the 32-token prompt")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    parser.add_argument("--profile", action="store_true", help="profile decode steps of ours int4 instead")
    parser.add_argument("--child", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.profile:
        profile_main(args.threads[0], read_bandwidth(args.threads[0]), prompt_ids(args.prefill)[:PROMPT_LEN])
        return

    source = embedded_model_path()
    ggufs = {"llama-q4_1": source, "llama-q4_0": q4_0_requantization(source)}
    ids = prompt_ids(args.prefill)
    bandwidth = {t: read_bandwidth(t) for t in args.threads}
    print(f"SmolLM2-135M-Instruct; decode: {args.decode} greedy steps after a {PROMPT_LEN}-token prompt; prefill: "
          f"one {args.prefill}-token prompt; median (min-max) of {args.runs} alternating runs, one process each")
    for name in ("llama-q4_1", "llama-q4_0"):
        print(f"- {ENGINES[name]}: {tensor_types(ggufs[name])}")
    print("- read bandwidth (_core.read_bandwidth_probe, 1 GiB): "
          + ", ".join(f"{bandwidth[t] / 1e9:.1f} GB/s at {t} thread(s)" for t in args.threads) + "\n")
    print(f"| engine | threads | decode tok/s | vs {ENGINES[REFERENCE]} | prefill tok/s | vs {ENGINES[REFERENCE]} "
          "| MB read/token | % ceiling | peak RSS MB | RSS at end MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    agreement = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompt.json"
        prompt_file.write_text(json.dumps(ids))
        for threads in args.threads:
            results: dict[str, list[dict]] = {name: [] for name in ENGINES}
            for _ in range(args.runs):
                for name in ENGINES:
                    results[name].append(run_child(name, threads, args, prompt_file, ggufs))
            ref_d = statistics.median(r["decode_tps"] for r in results[REFERENCE])
            ref_p = statistics.median(r["prefill_tps"] for r in results[REFERENCE])
            for name, runs in results.items():
                d = [r["decode_tps"] for r in runs]
                p = [r["prefill_tps"] for r in runs]
                per_token = runs[0]["bytes_per_token"]
                share = [x * per_token / bandwidth[threads] for x in d]
                print(f"| {ENGINES[name]} | {threads} | {spread(d, '.1f')} | {statistics.median(d) / ref_d:.2f}x "
                      f"| {spread(p, '.0f')} | {statistics.median(p) / ref_p:.2f}x | {per_token / 1e6:.1f} "
                      f"| {spread([100 * s for s in share], '.0f')}% "
                      f"| {statistics.median(r['peak_rss_mb'] for r in runs):.0f} "
                      f"| {statistics.median(r['end_rss_mb'] for r in runs):.0f} |", flush=True)
            ours, theirs = results["ours-int4"][0]["tokens"], results[REFERENCE][0]["tokens"]
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
            agreement.append(f"{threads} thread(s): {same} of {len(ours)}")
    print("\nGreedy tokens identical between ours int4 and llama.cpp Q4_1 (same weights) before the first "
          "difference: " + "; ".join(agreement))


if __name__ == "__main__":
    main()
