"""Trellis benchmarks: Gaussian distortion per codebook and K, and decode GEMV speed.

1. MSE of trellis codes on i.i.d. N(0,1) weights (tail-biting, via the public quantize_weight), next to
   the rate-distortion bound 2^-2K and the Lloyd-Max scalar quantizer.
2. GEMV (M=1) time at decode shapes: trellis K=2/3/4 vs int4 g128 vs torch fp32 F.linear, 1 and 2
   threads, measured side by side in one run (the trellis time includes both Hadamard transforms).

Usage: python benchmarks/trellis.py [--tiles 256] [--shapes 4096x4096 11008x4096] [--skip-distortion]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import metal_marlin as mm
from metal_marlin.formats.trellis import CODEBOOKS

LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497}


def median_time(fn, min_time: float = 0.3, min_runs: int = 7) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def distortion_table(tiles: int) -> None:
    w = torch.randn(16 * int(tiles**0.5), 16 * int(tiles**0.5), generator=torch.Generator().manual_seed(0))
    print(f"\n## Distortion on i.i.d. N(0,1), {w.numel() // 256} tiles (MSE per weight)\n")
    print("| K | " + " | ".join(CODEBOOKS) + " | 2^-2K | Lloyd-Max | encode s/tile (3inst) |")
    print("|---|" + "---:|" * (len(CODEBOOKS) + 3))
    for bits in (2, 3, 4):
        cells, secs = [], 0.0
        for cb in CODEBOOKS:
            start = time.perf_counter()
            tw = mm.quantize_weight(w, "trellis", bits=bits, codebook=cb)
            if cb == "3inst":
                secs = (time.perf_counter() - start) / (w.numel() // 256)
            cells.append(f"{(tw.dequantize() - w).square().mean().item():.5f}")
        print(f"| {bits} | " + " | ".join(cells) + f" | {2.0 ** (-2 * bits):.5f} | {LLOYD_MAX[bits]:.5f} "
              f"| {secs * 1e3:.2f} ms |")


def random_trellis(n: int, k: int, bits: int) -> mm.TrellisWeight:
    # Random streams: the kernel's speed does not depend on the codes, and encoding 16M weights is slow.
    g = torch.Generator().manual_seed(bits)
    words = torch.randint(-(2**31), 2**31 - 1, (n // 16, k // 16, 8 * bits), generator=g, dtype=torch.int64)
    from metal_marlin.formats.hadamard import hadamard_block_size

    return mm.TrellisWeight(mm.get_format("trellis"), (n, k), words.to(torch.int32), torch.ones(k).half(),
                            torch.ones(n).half(), bits, "3inst", hadamard_block_size(k), hadamard_block_size(n))


def speed_table(shapes: list[tuple[int, int]], threads: list[int]) -> None:
    from metal_marlin.ops import quant_matmul, trellis_matmul

    for t in threads:
        torch.set_num_threads(t)
        print(f"\n## GEMV M=1, {t} thread(s): microseconds (speedup vs dense fp32)\n")
        print("| shape NxK | fp32 F.linear | int4 g128 | trellis K=4 | trellis K=3 | trellis K=2 |")
        print("|---|---:|---:|---:|---:|---:|")
        for n, k in shapes:
            x = torch.randn(1, k)
            dense = torch.randn(n, k)
            t_dense = median_time(lambda: F.linear(x, dense))  # noqa: B023
            q4 = mm.quantize_weight(dense[:, :], "int4", group_size=128, scale_method="absmax")
            t_int4 = median_time(lambda: quant_matmul(x, q4.packed, q4.scales, q4.offsets, None, "int4", 128))  # noqa: B023
            cells = [f"{t_dense * 1e6:.0f}", f"{t_int4 * 1e6:.0f} ({t_dense / t_int4:.2f}x)"]
            for bits in (4, 3, 2):
                tw = random_trellis(n, k, bits)
                args = (tw.trellis, tw.su, tw.sv, None, bits, "3inst", tw.had_in, tw.had_out)
                tt = median_time(lambda: trellis_matmul(x, *args))  # noqa: B023
                cells.append(f"{tt * 1e6:.0f} ({t_dense / tt:.2f}x)")
            print(f"| {n}x{k} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-distortion", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads))
    if not args.skip_distortion:
        distortion_table(args.tiles)
    speed_table([tuple(int(v) for v in s.split("x")) for s in args.shapes], args.threads)


if __name__ == "__main__":
    main()
