"""Trellis benchmarks: Gaussian distortion per codebook and K, and encoder and decode GEMV speed.

1. MSE of trellis codes on i.i.d. N(0,1) weights (tail-biting, via the public quantize_weight), next to
   the rate-distortion bound 2^-2K and the Lloyd-Max scalar quantizer.
2. Viterbi encoder tiles per second on every CPU path this machine runs (scalar, avx2, avx512), 1 thread.
3. GEMV (M=1) time at decode shapes: trellis K=2/3/4 vs int4 g128 vs torch fp32 F.linear, 1 and 2
   threads, measured side by side in one run (the trellis time includes both Hadamard transforms).
4. The trellis kernel alone (K=4, 3inst) at M=1 and M=8 on every SIMD path, 1 thread.

The machine may be shared: compare the ratios within one run, not the absolute times across runs.

Usage: python benchmarks/trellis.py [--tiles 256] [--shapes 4096x4096 11008x4096] [--skip-distortion]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import metal_marlin as mm
from metal_marlin import _core
from metal_marlin.formats.trellis import CODEBOOKS

LLOYD_MAX = {2: 0.1175, 3: 0.03454, 4: 0.009497}


def best_time(fn, min_time: float = 0.3, min_runs: int = 7) -> float:
    """The fastest of the runs: on a shared machine the least disturbed one."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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


def simd_paths() -> list[str]:
    """The distinct trellis kernel paths of this machine, best first (set_simd_level selects them)."""
    paths, previous = [], _core.simd_level()
    try:
        for level in ("avx512", "avx2", "scalar"):
            try:
                _core.set_simd_level(level)
            except ValueError:
                continue
            if _core.trellis_simd_level() not in paths:
                paths.append(_core.trellis_simd_level())
    finally:
        _core.set_simd_level(previous)
    return paths


def encoder_table(paths: list[str]) -> None:
    print("\n## Viterbi encoder, 1 thread: tiles per second (3inst)\n")
    print("| K | " + " | ".join(paths) + " |")
    print("|---|" + "---:|" * len(paths))
    targets = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        packed, values = torch.empty(4, 8 * bits, dtype=torch.int32), torch.empty(4, 256)
        cells = []
        for path in paths:
            previous = _core.set_simd_level(path)
            try:
                t = best_time(lambda: _core.trellis_quantize(targets, bits, "3inst", packed, values, 1),  # noqa: B023
                                min_time=0.0, min_runs=3 if path == "scalar" else 7)
            finally:
                _core.set_simd_level(previous)
            cells.append(f"{4 / t:.1f}")
        print(f"| {bits} | " + " | ".join(cells) + " |", flush=True)


def kernel_path_table(shapes: list[tuple[int, int]], paths: list[str]) -> None:
    print("\n## trellis_matmul kernel (K=4, 3inst, no Hadamards), 1 thread: microseconds per path\n")
    print("| shape NxK | " + " | ".join(f"{p} M=1 | {p} M=8" for p in paths) + " |")
    print("|---|" + "---:|" * (2 * len(paths)))
    for n, k in shapes:
        packed = random_trellis(n, k, 4).trellis
        cells = []
        for path in paths:
            previous = _core.set_simd_level(path)
            try:
                for m in (1, 8):
                    x, out = torch.randn(m, k), torch.empty(m, n)
                    t = best_time(lambda: _core.trellis_matmul(x, packed, out, 4, "3inst", 1),  # noqa: B023
                                    min_time=0.0 if path == "scalar" else 0.3, min_runs=3 if path == "scalar" else 7)
                    cells.append(f"{t * 1e6:.0f}")
            finally:
                _core.set_simd_level(previous)
        print(f"| {n}x{k} | " + " | ".join(cells) + " |", flush=True)


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
            t_dense = best_time(lambda: F.linear(x, dense))  # noqa: B023
            q4 = mm.quantize_weight(dense[:, :], "int4", group_size=128, scale_method="absmax")
            t_int4 = best_time(lambda: quant_matmul(x, q4.packed, q4.scales, q4.offsets, None, "int4", 128))  # noqa: B023
            cells = [f"{t_dense * 1e6:.0f}", f"{t_int4 * 1e6:.0f} ({t_dense / t_int4:.2f}x)"]
            for bits in (4, 3, 2):
                tw = random_trellis(n, k, bits)
                args = (tw.trellis, tw.su, tw.sv, None, bits, "3inst", tw.had_in, tw.had_out)
                tt = best_time(lambda: trellis_matmul(x, *args))  # noqa: B023
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
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    if not args.skip_distortion:
        distortion_table(args.tiles)
    paths = simd_paths()
    encoder_table(paths)
    speed_table(shapes, args.threads)
    kernel_path_table(shapes[:1], paths)


if __name__ == "__main__":
    main()
