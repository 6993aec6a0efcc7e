"""Keep freed memory in the process while training on a CPU, so a step does not page-fault its buffers back in.

A training step allocates and frees the same ~100 tensors of 1-25 MB every step (attention scores, activations
saved for backward, their gradients). glibc's malloc serves blocks above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with fresh mmap()s and returns them to the kernel on free; every new page is then zeroed
by a page fault on first touch: ~20,000 faults and 80 MB zeroed per step of the SmolLM2-135M benchmark, 7-20 % of
its time in our runs, with the products that write fresh outputs slowed most. Raising the mmap threshold and the trim
threshold keeps those blocks in the heap for reuse (what jemalloc or tcmalloc, the allocators PyTorch's CPU tuning
guide recommends preloading, do by design). Peak memory is unchanged: the same blocks are reused, not added to.

The setting is process-wide, so it is made only when training starts, once, and not at all where the user chose:
an allocator preloaded (LD_PRELOAD), glibc's own MALLOC_* / GLIBC_TUNABLES variables set, another C library, or
LLAMA_ADAPTER_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 256 << 20  # blocks above this (a vocabulary-wide logits buffer of a big batch) still come from mmap
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept for the next step, at most


def why_not_tuned() -> str | None:
    """The reason the allocator is left as it is, or None where `keep_freed_memory` may tune it."""
    if os.environ.get("LLAMA_ADAPTER_MALLOC_TUNING", "1") == "0":
        return "LLAMA_ADAPTER_MALLOC_TUNING=0"
    if os.environ.get("LD_PRELOAD"):
        return "an allocator or library is preloaded (LD_PRELOAD)"
    chosen = [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]
    if chosen:
        return f"the environment sets {chosen[0]}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for training (once per process); True if they are set."""
    if why_not_tuned() is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
