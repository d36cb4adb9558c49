"""Keep freed tensor memory in the process for reuse, instead of handing it back to the kernel at every free.

PyTorch's CPU allocator is glibc's malloc. By default glibc serves every large block with its own mmap and unmaps
it on free, and trims the heap's free top, so each forward pass faults in (and zeroes) all its activations again.
With larger thresholds the memory stays in the process for the next batch; the price is up to the threshold of
free memory kept at the peak. docs/throughput.md has the measurements.

The thresholds hold for every arena, but a thread that allocates first gets an arena of its own, whose heaps are
too small for a batch's logits, so those are mapped anew every time. Ray Data calls a model stage from a thread
of its own, which had its arena before the model loaded; glibc reads `MALLOC_ARENA_MAX` once at process start,
so the bulk job's model actors and the training workers are started with `ONE_ARENA_ENV`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
DEFAULT_THRESHOLD = 256 << 20
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}  # every thread allocates from the main arena, which keeps freed memory
# Kept free memory spreads over the heap as blocks of other sizes come and go; a trim this often hands most of
# it back for about one batch's page faults per interval.
TRIM_INTERVAL_S = 30.0


def _glibc():
    """The C library if it is glibc (whose mallopt parameter numbers are above), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim, libc.gnu_get_libc_version  # noqa: B018 - only glibc has all three
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve blocks below `threshold` bytes from the heap and keep up to `threshold` of free heap; False where the C
    library is not glibc (musl, macOS), which is left as it is.

    Threads that have not allocated yet will share the main arena; those that have keep theirs (see above).
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(M_ARENA_MAX, 1)
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))


class FreedMemoryTrimmer:
    """Call after each batch: every `interval` seconds, hands the heap's free pages back to the kernel
    (glibc's malloc_trim), so the memory kept for reuse stays near one batch's worth instead of spreading."""

    def __init__(self, interval: float = TRIM_INTERVAL_S, clock=time.monotonic):
        libc = _glibc()
        self._trim = libc.malloc_trim if libc is not None else None
        if self._trim is not None:
            self._trim.argtypes, self._trim.restype = (ctypes.c_size_t,), ctypes.c_int
        self.interval, self._clock = interval, clock
        self._last = clock()

    def __call__(self) -> bool:
        """True when it trimmed now."""
        if self._trim is None or self._clock() - self._last < self.interval:
            return False
        self._trim(0)
        self._last = self._clock()
        return True
