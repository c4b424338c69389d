"""This machine's matmul peak per dtype: the denominator of "fraction of peak" in the benchmarks.

    .venv/bin/python bench/matmul_peak.py [--threads 2] [--size 1024]
    .venv/bin/python bench/matmul_peak.py --threads 1 --size 128      # smallest (tests): a second or two

Times torch.matmul of two square matrices (and nn.Linear at a SmolLM2 MLP shape) in float32 and
bf16 with the given thread count; prints the best GFLOP/s of each and one JSON line. On CPUs
without bf16 matrix instructions (AVX-512 BF16 / AMX) bf16 is the slow dtype; with them, the fast one.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def gflops(fn, flops: float, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def peaks(size: int = 1024, threads: int | None = None) -> dict[str, float]:
    """Best GFLOP/s per dtype over a square matmul and a (2 size x 576) @ (576 x 1536) linear."""
    if threads:
        torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        tokens = 2 * size
        x, w = torch.randn(tokens, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        out[str(dtype).removeprefix("torch.")] = max(
            gflops(lambda: a @ b, 2 * size ** 3, repeats=3 if dtype == torch.float32 else 1),
            gflops(lambda: torch.nn.functional.linear(x, w), 2 * tokens * 576 * 1536))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    result = {"threads": torch.get_num_threads() if not args.threads else args.threads, **peaks(args.size, args.threads)}
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype:9s} {result[dtype]:8.1f} GFLOP/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
