"""The host allocator of a training process: keep freed tensor memory in glibc's heap.

glibc's malloc serves each allocation above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB) with a fresh mmap and returns heap memory above its trim threshold to
the system when it is freed. A CPU training step allocates and frees the same few-MiB
activations every step (the quick-start's MoE layer: [T*K, F] = 4 MiB tensors), so each one is
mapped, page-faulted in on first touch and unmapped again, step after step. Measured on the 2-core
machine (torch 2.13.0 CPU, quick-start, interleaved rounds, median): the MoE layer's forward and
backward 31-35 ms -> 27 ms, the bench's whole MoE training step 203 -> 170 ms and the dense
counterpart's 138 -> 121 ms; `moeplat run` of 200 quick-start steps, where data loading, Lightning
and logging add their own allocations, 3-5% more tokens/s (9938 -> 10452, 10341 -> 10679). jemalloc and tcmalloc do the same when preloaded (PyTorch's CPU tuning guides
recommend them); mallopt does it from inside the process, with nothing to install.

Trade-off: a process's resident memory no longer falls back after a peak (the freed memory is
reused by later steps instead). Only training processes call this (moeplat run, sweep trials,
repro, bench); the server and the workers, which live long and train nothing, keep the defaults.
MOEPLAT_MALLOPT=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # a C int: never trim


def keep_heap_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and never trim it (mallopt); True where it
    took effect (Linux with glibc, MOEPLAT_MALLOPT not 0), False elsewhere (a no-op)."""
    if os.environ.get("MOEPLAT_MALLOPT", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
