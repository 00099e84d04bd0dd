"""Keeping a long-lived server process's C heap from creeping up.

The ingress runs QC, post-processing and catalog writes on a thread pool. Two things in glibc's
allocator make its RSS climb though nothing live grows:

- It keeps the memory those threads free for reuse, so the RSS climbs in steps under bursts of
  load and never comes down. `HeapTrimmer` calls `malloc_trim(0)` when the server is idle, at most
  once per interval, so the RSS is what the process holds.
- Every thread that finds the heap locked gets an arena of its own (up to 8 per core), and each
  arena fragments on its own: small blocks still in use pin pages that `malloc_trim` cannot give
  back, and the arenas' extent grows with the requests served. `python -m benchmarks.heap_growth`
  (benchmarks/RESULTS.md): with glibc's default of 16 arenas on 2 cores the extent grew 5.3 MB over
  2,000 requests and was still growing, 55 MB free inside it; with 2 it stopped after 600 requests,
  31 MB free, the RSS 12 MB lower. `allocator_env()` is the environment that caps them
  (`MALLOC_ARENA_MAX`, read by glibc when the process starts: it is set in the replica's Ray
  runtime environment, not from inside the process).

Elsewhere than glibc (musl, macOS) there is no `malloc_trim`, and `MALLOC_ARENA_MAX` means nothing:
the trimmer does nothing, the variable is ignored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

TRIM_INTERVAL_S = 60.0
MALLOC_ARENAS = 2


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a server process's allocator: at most `MALLOC_ARENAS` malloc
    arenas, unless the operator set MALLOC_ARENA_MAX already (in `environ`, the driver's)."""
    env = os.environ if environ is None else environ
    return {"MALLOC_ARENA_MAX": env.get("MALLOC_ARENA_MAX", str(MALLOC_ARENAS))}


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def malloc_arenas() -> int | None:
    """How many malloc arenas this process has (the `<heap nr=…>` elements of glibc's
    `malloc_info` report); None elsewhere than glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "malloc_info"):
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "malloc.xml")
        fp = libc.fopen(path.encode(), b"w")
        if not fp:
            return None
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        with open(path) as f:
            return f.read().count("<heap nr=")


class HeapTrimmer:
    """`maybe_trim()`: malloc_trim(0) if `interval_s` has passed since the last trim."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._trim = _malloc_trim()
        self._last = clock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> bool:
        """True when it trimmed now (a few milliseconds for a heap of a few hundred MB)."""
        if self._trim is None or self.clock() - self._last < self.interval_s:
            return False
        self._last = self.clock()
        try:
            self._trim(0)
        except OSError as e:  # never let memory housekeeping fail a request
            logger.warning("malloc_trim failed: %s", e)
            return False
        self.trims += 1
        return True
