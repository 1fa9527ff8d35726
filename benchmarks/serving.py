"""Load test of ``metal-marlin serve`` with the embedded default model, on loopback.

Starts the server as a subprocess (``--threads`` torch threads), then for each concurrency level keeps
that many greedy ``/v1/completions`` requests in flight until ``--waves`` x concurrency requests are
done (or ``--level-seconds`` pass, then it waits for those in flight). Concurrency 1 is sequential
one-at-a-time serving. Throughput = completion tokens of all requests / wall time of the level; latency
is per request, end to end. Runs the default (batch-invariant) server and, with ``--both-modes``, one
started with ``--no-batch-invariance`` as well.

Usage: python benchmarks/serving.py [--levels 1 4 16] [--max-tokens 32] [--waves 2] [--both-modes]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = ["Once upon a time, in a small village,", "The history of the printing press", "A recipe for bread:",
           "The planets of the solar system are", "In the year 2050, cities will", "Dear diary, today I",
           "The rules of chess are simple:", "A walk in the forest at dawn"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "metal_marlin.cli", "--threads", str(threads), "serve", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", "16", "--kv-blocks", "256", "--max-queue", "64", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


async def run_level(url: str, model: str, concurrency: int, total: int, max_tokens: int, seconds: float) -> dict:
    latencies, tokens = [], 0
    started = time.perf_counter()
    issued = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal issued, tokens
        while issued < total and time.perf_counter() - started < seconds:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                               "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "tokens": tokens, "tok_s": tokens / wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1,
                                                                      round(0.95 * (len(latencies) - 1)))]}


def bench_mode(label: str, extra: list[str], args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    port = free_port()
    proc = start_server(port, args.threads, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 1, 4, 60))  # warm-up
        rows = []
        for c in args.levels:
            result = asyncio.run(run_level(url, model, c, max(args.waves * c, 4), args.max_tokens,
                                           args.level_seconds))
            print(f"  {label} c={c}: {result}", file=sys.stderr)
            rows.append((label, c, result))
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="must include 1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency (>= 4)")
    parser.add_argument("--level-seconds", type=float, default=90, help="stop issuing requests after this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--both-modes", action="store_true", help="also measure --no-batch-invariance")
    args = parser.parse_args()
    rows = bench_mode("batch-invariant", [], args)
    if args.both_modes:
        rows += bench_mode("no-batch-invariance", ["--no-batch-invariance"], args)
    fastest_sequential = max(r["tok_s"] for _, c, r in rows if c == 1)
    print(f"\n{args.threads} threads, {args.max_tokens} max tokens per greedy completion, loopback\n")
    print("| server | concurrency | requests | tokens | tok/s | x c=1 (same server, sequential) | "
          "x fastest sequential | p50 latency s | p95 latency s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, c, r in rows:
        base = next(x["tok_s"] for lab, cc, x in rows if lab == label and cc == 1)
        print(f"| {label} | {c} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | "
              f"{r['tok_s'] / fastest_sequential:.2f} | {r['p50']:.2f} | {r['p95']:.2f} |")

if __name__ == "__main__":
    main()
