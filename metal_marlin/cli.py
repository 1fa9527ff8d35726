"""The ``metal-marlin`` command: parses arguments and calls the library.

MODEL is a metal-marlin checkpoint directory, a GGUF file, a transformers model directory, a hub id
(when online), or omitted for the embedded default (SmolLM2-135M-Instruct Q4_1).
"""

from __future__ import annotations

import argparse
import sys

import torch

MODEL_HELP = "checkpoint dir, GGUF file, transformers dir or hub id (default: embedded SmolLM2-135M-Instruct)"


def _load(args: argparse.Namespace, need_tokenizer: bool = True, runtime: bool = True):
    """Our runtime (``TrellisForCausalLM``) for generation and evaluation of the supported architectures;
    the transformers model when quantizing (``runtime=False``)."""
    from .models import load_model, load_transformers_model

    model, tokenizer = (load_model if runtime else load_transformers_model)(args.model)
    if need_tokenizer and tokenizer is None:
        raise ValueError(f"{args.model}: the model has no tokenizer (a GGUF without tokenizer metadata?)")
    return model, tokenizer


def _generation_kwargs(args: argparse.Namespace) -> dict:
    from .generation import SamplingParams

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    params = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed)
    SamplingParams(**params)  # validates
    return dict(max_new_tokens=args.max_tokens, **params)


def _stream(model, tokenizer, prompt, kwargs: dict) -> str:
    """Print the reply as it is generated; returns its text."""
    from .generation import stream_text
    from .models import TrellisForCausalLM

    if not isinstance(model, TrellisForCausalLM):
        raise ValueError(f"{model.config.model_type}: generation needs an architecture TrellisForCausalLM supports")
    pieces = []
    for piece in stream_text(model, tokenizer, prompt, **kwargs):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print()
    return "".join(pieces)


def cmd_quantize(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from .formats import GroupFormat, get_format
    from .models import save_quantized
    from .models.checkpoint import check_output_dir
    from .models.quantize import CalibrationSettings, quantize_model
    from .nn import dequantize_model, replace_linear_layers

    fmt = get_format(args.format, args.bits)
    method = args.method or ("rtn" if isinstance(fmt, GroupFormat) else "ldlq")
    if (method == "gptq") != isinstance(fmt, GroupFormat) and method != "rtn":
        raise ValueError(f"--method {method} does not apply to format {fmt.name} "
                         "(gptq is for group formats, ldlq for trellis)")
    if args.bpw is not None and (fmt.name != "trellis" or method != "ldlq"):
        raise ValueError("--bpw chooses trellis bits per tensor: use it with --format trellis (method ldlq)")
    if args.calibration and method == "rtn":
        raise ValueError("--calibration needs --method gptq (group formats) or ldlq (trellis)")
    check_output_dir(args.out, args.overwrite)
    settings = dict(format=fmt.name, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                    scale_method=args.scale_method, codebook=args.codebook, skip=args.skip)
    model, tokenizer = _load(args, need_tokenizer=method != "rtn", runtime=False)
    dequantize_model(model)
    out = Path(args.out)
    work_dir = out.parent / f".{out.name}.partial"
    if method == "rtn":
        summary = replace_linear_layers(model, progress=True, **settings)
    else:
        if work_dir.exists():
            print(f"resuming from {work_dir}", file=sys.stderr)
        text = None if args.calibration is None else Path(args.calibration).read_text(encoding="utf-8")
        calibration = CalibrationSettings(n_samples=args.samples, seq_len=args.calib_seq_len, act_order=args.act_order)
        summary = quantize_model(model, tokenizer, calibration_text=text, calibration=calibration,
                                 work_dir=work_dir, bpw=args.bpw, progress=True, **settings)
    quantizer = {"method": method, "scale_method": args.scale_method, "source": args.model or "embedded-default"}
    if method != "rtn":
        quantizer.update(calibration=args.calibration or "default corpus", samples=args.samples,
                         seq_len=args.calib_seq_len, act_order=args.act_order, bpw=args.bpw)
    save_quantized(model, args.out, tokenizer, quantizer=quantizer, overwrite=args.overwrite)
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{summary}\nwrote {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    kwargs = _generation_kwargs(args)
    if args.stream:
        print(args.prompt, end="", flush=True)
        _stream(model, tokenizer, args.prompt, kwargs)
        return 0
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, **kwargs)
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args)
    kwargs = _generation_kwargs(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message; Ctrl-D or /exit ends the session.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": _stream(model, tokenizer, messages, kwargs)})


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import load_corpus, perplexity

    text = load_corpus(args.text)
    model, tokenizer = _load(args)
    result = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens,
                        batch_size=args.batch_size, progress=True)
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}, {result.n_windows} windows of "
          f"{args.seq_len} tokens, {result.n_targets} targets)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .models.info import describe

    print(describe(args.path))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(max_tokens=args.max_tokens, print_fn=print)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.server import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, kv_blocks=args.kv_blocks,
          block_size=args.block_size, max_queue=args.max_queue, api_key=args.api_key, metrics_port=args.metrics_port,
          batch_invariant=args.batch_invariance)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metal-marlin", description="Low-bit quantized LLM inference.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quantize", help="quantize a model and save a metal-marlin checkpoint")
    p.add_argument("model", metavar="MODEL", help="checkpoint dir, GGUF file, transformers dir or hub id")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory")
    p.add_argument("--format", default="int4",
                   help="int2, int3, int4, int8, fp4, fp8, trellis (or a family int/fp with --bits)")
    p.add_argument("--bits", type=int, default=None, help="trellis bits (1-8, default 4), or the width of a family")
    p.add_argument("--method", choices=["rtn", "gptq", "ldlq"], default=None,
                   help="rtn: round to nearest (group formats' default); gptq: calibrated, group formats; "
                        "ldlq: calibrated trellis (trellis default)")
    p.add_argument("--calibration", default=None, metavar="TEXTFILE",
                   help="calibration text for gptq/ldlq (default: the default corpus, after its first 8192 tokens)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--act-order", action="store_true", help="gptq: visit columns by decreasing Hessian diagonal")
    p.add_argument("--bpw", type=float, default=None,
                   help="trellis: average bits per weight; bits per tensor chosen from a Hessian-weighted proxy")
    p.add_argument("--codebook", default="3inst", choices=["3inst", "1mad", "mcg", "mul1"], help="trellis codebook")
    p.add_argument("--group-size", type=int, default=128, help="32, 64, 128, ... or -1 for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--scale-method", default="mse", choices=["mse", "absmax"])
    p.add_argument("--skip", nargs="*", default=[r"(^|\.)lm_head$"], metavar="REGEX",
                   help="module names (regex search) kept dense; default: lm_head")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at OUT")
    p.set_defaults(func=cmd_quantize)

    def add_sampling(q: argparse.ArgumentParser, max_tokens: int) -> None:
        q.add_argument("--max-tokens", type=int, default=max_tokens)
        q.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        q.add_argument("--top-k", type=int, default=0, help="0 = off")
        q.add_argument("--top-p", type=float, default=1.0)
        q.add_argument("--repetition-penalty", type=float, default=1.0)
        q.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")

    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    add_sampling(p, 64)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat using the tokenizer's chat template")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--system", default=None, help="system message")
    add_sampling(p, 256)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="perplexity on a text file (default: the gensim lee_background corpus)")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--text", default=None, help="text file (default: gensim's lee_background.cor)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="format summary, bytes and bits per weight of a checkpoint or GGUF file")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (docs/serving.md)")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--kv-blocks", type=int, default=256, help="paged KV cache blocks (one is reserved)")
    p.add_argument("--block-size", type=int, default=16, help="token positions per KV block")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for admission; beyond: HTTP 429")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--metrics-port", type=int, default=None, help="also serve /metrics on this port")
    p.add_argument("--no-batch-invariance", dest="batch_invariance", action="store_false",
                   help="decode all running requests in one unpadded pass: faster at low concurrency, but a "
                        "request's output may then depend on the others in the last bits")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="import the embedded model, quantize it, compare perplexity, generate")
    p.add_argument("--max-tokens", type=int, default=2048, help="corpus tokens scored per model")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("metal-marlin: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"metal-marlin: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
