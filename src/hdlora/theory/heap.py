"""Keep the memory a Monte-Carlo state evolution frees in the process heap (glibc), instead of returning it.

A softmax state evolution allocates and frees the same multi-megabyte arrays at every iteration (at the default
3e4 samples the Newton kernel's outputs alone are 2-9 MB a call: the pre-training Hessians (n, 6, 6) are 8.6 MB).
With glibc's defaults such a block is either mapped and unmapped for every allocation (above the mmap threshold)
or handed back to the kernel when the heap's top is trimmed, and the next iteration takes its pages again one page
fault at a time.  Measured at the Fig. 1 point (3e4 samples, this machine): 3.0e4 page faults per solve (120 MB), of
about 1.0 s 0.06-0.08 s system time plus the faults' cost in user time; with the settings below, 2.2e4 faults in a
process's first solve (the heap grows once) and none in the following ones, 8-15 % faster (same numbers, bit for bit:
only where the memory comes from changes).

:func:`keep_freed_memory` sets ``M_MMAP_THRESHOLD`` (blocks up to 32 MiB come from the heap) and ``M_TRIM_THRESHOLD``
(the heap is not trimmed below 1 GiB of free top) with ``mallopt``, once per process, when the prox kernel is
loaded (:func:`hdlora.theory.newton.kernel`).  The process then keeps its peak heap (at the default n_mc about
0.1 GB) until it exits.  Both settings are needed: setting the trim threshold alone also freezes glibc's dynamic
mmap threshold at 128 KiB, and every block above it is mapped afresh (measured: 2.5e5 faults a solve).
No-op elsewhere than glibc, or with the environment variable ``HDLORA_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["keep_freed_memory"]

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (glibc's largest dynamic mmap threshold on 64-bit systems)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: the heap is trimmed only when this much is free at its top
TRIM_THRESHOLD = 1024 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the settings (once per process: cached); returns True when they are in effect."""
    if not sys.platform.startswith("linux") or os.environ.get("HDLORA_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        if not libc.gnu_get_libc_version:
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
