"""Keep freed tensor memory in the process for reuse, instead of handing it back to the kernel at every free.

PyTorch's CPU allocator is glibc's malloc. By default glibc serves every block above 128 KB-32 MB with its own
mmap and unmaps it on free, and trims the heap's free top, so each forward pass faults in (and zeroes) all its
activations again. On DeepLabv3-MobileNetV3 at 512x512 that was 1.1 s of system time per 6 batches of 4, and
with larger thresholds the forward ran 1.47x faster (README "Throughput"). The price is that a process keeps
up to the threshold of free memory at its peak; it is used for the next batch.

The thresholds hold for every arena, but a thread that allocates first gets an arena of its own, whose heaps are
at most 64 MB: larger blocks there (a batch's logits) are mapped anew every time. Ray Data calls a model stage
from a thread of its own, which had its arena before the model loaded: the actor ran 1.2x slower than the same
code on the main thread, with 7x the page faults. glibc reads `MALLOC_ARENA_MAX` once at process start, so
the bulk job's model actors (pipeline/segment.py) and training workers (pipeline/train.py) are started with
`ONE_ARENA_ENV`.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
DEFAULT_THRESHOLD = 256 << 20
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}  # every thread allocates from the main arena, which keeps freed memory


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve blocks below `threshold` bytes from the heap and keep up to `threshold` of free heap; False where the C
    library is not glibc (musl, macOS), which is left as it is.

    Threads that have not allocated yet will share the main arena; those that have keep theirs (see above).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has both, and the parameter numbers above are glibc's
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    mallopt(M_ARENA_MAX, 1)
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
