"""Giving freed heap memory back to the operating system in a long-lived server process.

The ingress runs QC, post-processing and catalog writes on a thread pool. glibc's allocator keeps
the memory those threads free in its heaps and per-thread arenas for reuse, so the process's RSS
climbs in steps under bursts of load and never comes down, though nothing live grows (measured in
a 30-minute soak: `malloc_trim(0)` returned all of the ingress's growth). `HeapTrimmer` calls
`malloc_trim(0)` when the server is idle, at most once per interval, so its RSS is what it holds.

Elsewhere than glibc (musl, macOS) there is no `malloc_trim`: the trimmer does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

TRIM_INTERVAL_S = 60.0


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
