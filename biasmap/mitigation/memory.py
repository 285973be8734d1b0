"""Keep freed heap memory inside the process while a CPU generation runs (glibc only).

Why: on CPU every UNet call (forward or backward) allocates and frees its activations
and oneDNN's per-call weight-reorder buffers (one per 3x3 convolution, up to 118 MB for
SD1.5's 2560->1280 convolutions). glibc serves allocations above its mmap threshold (at
most 32 MiB) with a fresh mmap, and returns freed memory at the top of the heap to the
system, so every call touches hundreds of MB of new pages: measured on SD1.5 at a 32x32
latent, about 165k minor page faults per forward and 300k per backward, which cost about
0.25 s of kernel time each and, with two threads, as much again in the other thread
waiting at the OpenMP barrier. A guided step makes three such calls (no-grad half,
grad half, backward) where a plain CFG step makes one, so the faults cost guided
sampling about 1.5 s per step against 0.7 s for plain sampling.

`retain_freed_memory()` sets glibc's M_MMAP_MAX to 0 and M_TRIM_THRESHOLD to its
maximum for the duration of the block, so freed memory stays in the heap and the next
call reuses pages that are already mapped (0 faults after the first step). The
numerics are untouched. On exit it restores M_MMAP_MAX to glibc's default (65536) and
M_TRIM_THRESHOLD to 64 MiB (the value glibc's dynamic threshold reaches once a 32 MiB
block has been freed, as in any process holding a diffusion model) and calls
malloc_trim(0), which hands the retained memory back to the system. glibc has no way
to re-enable its dynamic threshold adjustment once mallopt has set a value, so these
restored values stay fixed for the rest of the process.

It is a no-op where the C library is not glibc (macOS, Windows, musl) and when the
environment variable BIASMAP_RETAIN_FREED_MEMORY is "0". Nested and concurrent uses
share one process-wide setting: the outermost block restores it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_HELD_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_RESTORED_TRIM_THRESHOLD = 64 * 2**20  # 2 x DEFAULT_MMAP_THRESHOLD_MAX (64-bit glibc)
_RESTORED_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX
ENV_VAR = "BIASMAP_RETAIN_FREED_MEMORY"

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has mallopt and malloc_trim), else None."""
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                names = ("gnu_get_libc_version", "mallopt", "malloc_trim")
                if all(hasattr(libc, name) for name in names):
                    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    _libc = libc
            except OSError:
                pass
    return _libc


def available() -> bool:
    """Whether retain_freed_memory() has an effect here (glibc, and not switched off)."""
    return os.environ.get(ENV_VAR, "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def retain_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, keep freed memory in the heap instead of returning it to the OS.

    Yields whether the setting is in effect. See the module docstring for why and what
    it changes; `enabled=False` (e.g. for a CUDA pipeline) makes it a no-op.
    """
    global _depth
    libc = _glibc() if enabled and available() else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _HELD_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _RESTORED_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _RESTORED_TRIM_THRESHOLD)
                libc.malloc_trim(0)
