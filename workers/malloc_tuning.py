"""glibc malloc settings for the step loop.

A step allocates and frees many activations of a few hundred KiB to a few MiB. With glibc's
defaults each of them is a fresh ``mmap`` (and ``munmap``) or a heap trim, so every step pays
page faults and zeroing for memory it just gave back: on the tiny model that was half of a
decode step's time. Raising the mmap threshold and the trim threshold keeps those buffers in the
heap and reuses them. ``tune_malloc`` is called at the start of every process that runs steps;
it is a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024   # glibc's maximum: larger blocks are still mmapped
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024  # free heap kept for reuse before it is returned to the OS

_done = False


def tune_malloc() -> bool:
    """Apply the thresholds once per process; returns whether glibc accepted them."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                              TRIM_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused the thresholds; keeping the C library's defaults")
    _done = ok
    return ok
