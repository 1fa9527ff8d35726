"""The ``metal-marlin`` command: parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

import torch


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    torch.set_num_threads(args.threads)
    rows = run_demo(seq_len=args.seq_len)
    print(f"{'format':<8}{'group':>6}{'MiB':>8}{'smaller':>9}{'logit err':>11}{'top-1 agree':>13}{'ms':>8}")
    for r in rows:
        group = "chan" if r.group_size == -1 else str(r.group_size)
        print(f"{r.format:<8}{group:>6}{r.mib:>8.2f}{r.compression:>8.2f}x{r.logit_rel_error:>11.4f}"
              f"{r.top1_agreement:>13.3f}{r.forward_ms:>8.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metal-marlin", description="Low-bit quantized LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a small Llama built from a config with every format and "
                                       "compare its logits with the float32 model")
    demo.add_argument("--seq-len", type=int, default=64)
    demo.add_argument("--threads", type=int, default=torch.get_num_threads())
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"metal-marlin: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
