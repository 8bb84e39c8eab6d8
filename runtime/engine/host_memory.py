"""Host memory on a CPU device: memory a step frees stays in the process for the next step.

checkpoint ──builder──▶ engine dir ──[runtime: CPU allocator setting]──▶ Triton

On a GPU, PyTorch's caching allocator hands each step the blocks the previous step freed. On
the CPU, tensors come from the C library's malloc, which maps large blocks on their own and
unmaps them on free, and trims the top of its heap: every engine step then pays for unmapping
its logits and activations and for faulting fresh pages back in. (Measured on a 2-core VM,
QuadraticSpec k = 8 at 32 requests, 3 MB of logits: freeing them took 2-2.5 ms in about half of
the steps.) `keep_freed_memory()` raises glibc's mmap threshold to its ceiling (32 MiB) and its
trim threshold to 1 GiB, so freed blocks are reused from the heap the way a caching allocator
would. The process keeps its peak heap; weights and the KV cache, larger than the ceiling, are
still mapped on their own. On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 << 20  # glibc's largest mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; True if it took effect."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("CPU device: freed memory %s kept for reuse", "is" if done else "is not")
    return done
