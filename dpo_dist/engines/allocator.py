"""glibc malloc settings for the processes that run the model on CPU (Ray scoring actors, CPU ranks).

By default glibc serves every allocation above a moving threshold (at most 32 MiB) with a fresh
mmap and unmaps it on free; a forward of a few thousand tokens frees and reallocates activations of
tens of MiB each layer, so the kernel zeroes fresh pages again and again. Measured on SmolLM2-135M in
bf16 on 2 cores (bench/bench_allocator.py, BENCHMARKS.md): scoring 1.38x the tokens/s, its system time
from 45 to 2 s per 100 s; LoRA steps unchanged within noise (0.97x). Here the threshold is fixed at
its 32 MiB maximum and freed memory stays in the heap for the next batch: the heap is trimmed only
when 2 GiB lie free at its top (a trim threshold of 1 GiB still gave the memory back between LoRA
steps). Nothing changes where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: (1 << 31) - 1, M_TOP_PAD: 512 << 20}
_done = False


def keep_freed_memory() -> bool:
    """Apply SETTINGS to this process's glibc malloc (once); False where there is no glibc."""
    global _done
    if _done:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _done = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _done
