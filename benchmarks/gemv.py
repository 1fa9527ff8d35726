"""CPU GEMV at decode shapes: quantized weight bandwidth vs measured read bandwidth, and vs dense fp32.

Prints one table per thread count. Columns:
  GB/s    weight bytes (packed codes + scales + offsets) read per second by quant_matmul at M=1
  %bw     that, as a share of this machine's read bandwidth measured in the same run
  dense   torch fp32 F.linear time on the dense weight, same threads
  speedup dense time / quantized time

Usage: python benchmarks/gemv.py [--threads 1 2] [--shapes 4096x4096 11008x4096] [--formats int4 fp4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import metal_marlin as mm

FORMATS = [("int4", False), ("int4", True), ("fp4", True), ("int8", True), ("fp8", True), ("int3", False),
           ("int2", False)]


def median_time(fn, min_time: float = 0.3, min_runs: int = 10) -> float:
    """Median seconds per call over at least ``min_runs`` calls and ``min_time`` seconds."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """Bytes/s that _core's streaming read probe (wide loads on the kernels' thread pool) reaches on a
    buffer far larger than the caches."""
    from metal_marlin import _core

    buf = torch.ones(nbytes, dtype=torch.uint8)
    return nbytes / median_time(lambda: _core.read_bandwidth_probe(buf, threads), min_runs=5)


def _core_level() -> str:
    from metal_marlin import _core

    return _core.simd_level()


def random_quantized(n: int, k: int, fmt: str, symmetric: bool, group_size: int) -> mm.GroupQuantizedWeight:
    # Codes and scales are random: speed does not depend on values, and RTN on 45M weights is slow.
    f = mm.get_format(fmt)
    codes = torch.randint(0, 2**f.bits, (n, k), dtype=torch.uint8)
    if fmt == "fp8":
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    groups = k // group_size
    scales = (torch.rand(n, groups) * 0.01 + 0.001).half()
    offsets = None if symmetric else (-torch.rand(n, groups) * 0.05).half()
    return mm.GroupQuantizedWeight(f, (n, k), f.pack(codes), scales, offsets, group_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"],
                        help="NxK (out x in features)")
    parser.add_argument("--formats", nargs="+", default=None, help="subset of: int4 fp4 int8 fp8 int3 int2")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    formats = [f for f in FORMATS if args.formats is None or f[0] in args.formats]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]

    for threads in args.threads:
        torch.set_num_threads(threads)
        bw = read_bandwidth(threads)
        print(f"\n## {threads} thread(s): measured read bandwidth {bw / 1e9:.1f} GB/s, group size {args.group_size}, "
              f"SIMD {_core_level()}")
        print(f"| {'shape NxK':<11} | {'format':<10} | {'bits/w':>6} | {'quant us':>9} | {'GB/s':>6} | {'%bw':>5} "
              f"| {'dense us':>9} | {'speedup':>7} |")
        print("|" + "|".join("-" * w for w in (13, 12, 8, 11, 8, 7, 11, 9)) + "|")
        for n, k in shapes:
            x = torch.randn(1, k)
            dense = torch.randn(n, k)
            t_dense = median_time(lambda: F.linear(x, dense))  # noqa: B023
            for fmt, symmetric in formats:
                qw = random_quantized(n, k, fmt, symmetric, args.group_size)
                call = lambda: mm.quant_matmul(x, qw.packed, qw.scales, qw.offsets, None, fmt, qw.group_size)  # noqa: B023,E731
                t = median_time(call)
                gbs = qw.nbytes / t
                name = fmt + ("" if fmt.startswith("fp") else ("-sym" if symmetric else "-asym"))
                print(f"| {n}x{k:<6} | {name:<10} | {qw.bits_per_weight:>6.3f} | {t * 1e6:>9.1f} | {gbs / 1e9:>6.1f} "
                      f"| {100 * gbs / bw:>4.0f}% | {t_dense * 1e6:>9.1f} | {t_dense / t:>6.2f}x |")


if __name__ == "__main__":
    main()
