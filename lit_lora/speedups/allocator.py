"""Host memory allocator settings for training on CPU (glibc ``malloc`` only).

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and gives it back with
``munmap`` when freed; the threshold starts at 128 KiB and only grows as such blocks are freed. A CPU
training step allocates and frees the same large activation and gradient tensors every step, so with
the defaults each step page-faults (and zero-fills) them anew, and freed heap tops are trimmed back to
the system only to be asked for again. Measured on a 2-core EPYC with SmolLM2-135M, packed 8 x 512
batches: 282 -> 322 positions/s; padded 8 x ~230 batches: 343 -> 370 (``experiments/packing``).

:func:`tune_host_allocator` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the
trim threshold to 1 GiB, so such blocks are reused from the heap. Peak resident memory is what the
largest step needs either way; memory freed after it is kept by the process instead of returned.
PyTorch's own CPU performance guide suggests the same effect by preloading jemalloc or tcmalloc; this
needs no extra library. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**30
TOP_PAD = 256 * 2**20

_tuned = False


def tune_host_allocator() -> bool:
    """Apply the settings above once per process; returns whether they are in effect."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    _tuned = all(
        mallopt(option, value)
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    return _tuned
