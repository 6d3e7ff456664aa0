"""glibc malloc settings for a process that allocates the same large tensors every batch.

torch takes CPU tensors from ``malloc``. glibc serves allocations above its mmap threshold
(128 KiB at first, raised as such blocks are freed) with fresh ``mmap``s, and returns freed
memory at the top of its heap to the kernel once it passes the trim threshold. An inference
batch allocates and frees tensors of several MB (a batch of 256 holds 13 MB in each block's
MLP), so batches paid for the kernel to map and zero those pages again: measured on a 2-core
Zen 5 VM, 4,000-60,000 minor page faults per batch of 128-256 samples, varying from process to
process, and float32 throughput at 2 threads 0.6-0.9 of what the same code reached with
freed memory kept for reuse.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("cai_hpc")

# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks below the mmap threshold come from the heap, and up to TRIM_THRESHOLD of freed heap
# stays with the process: above what a batch holds at once (its largest tensor is 17 MB at
# batch 256), so after the first batch the same pages serve every batch. Older glibc (2.26 and
# 2.33 at least, as on Lambda's Amazon Linux 2 image) refuses mmap thresholds above 32 MiB on
# 64-bit (half its heap size), hence the second choice, still enough up to batches of ~480.
MMAP_THRESHOLDS = (256 << 20, 32 << 20)
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    Returns whether the settings took: False off glibc (macOS, musl), where there is nothing
    to set. With jemalloc or tcmalloc preloaded, glibc's settings take but do not matter (those
    allocators keep freed memory by themselves). Process-wide; safe to call more than once.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Setting either threshold turns off glibc's dynamic mmap threshold, so the mmap one must
    # take first: with the trim threshold alone, blocks above the mmap threshold glibc had
    # reached by then would be mapped afresh every time.
    mmap = next((size for size in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, size)), None)
    tuned = mmap is not None and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc: keeps freed memory %s", f"(mmap threshold {mmap >> 20} MiB)" if tuned else "UNCHANGED")
    return tuned
