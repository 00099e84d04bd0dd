"""The ingress's heap trimmer: memory freed by finished requests goes back to the OS when idle."""

from __future__ import annotations

import platform

import numpy as np
import psutil
import pytest

from app.serve.heap import HeapTrimmer, allocator_env

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


@glibc
def test_trims_at_most_once_per_interval():
    now = [100.0]
    trimmer = HeapTrimmer(interval_s=60, clock=lambda: now[0])
    assert trimmer.available
    assert not trimmer.maybe_trim()  # the interval counts from the server's start
    now[0] += 60
    assert trimmer.maybe_trim()
    now[0] += 59
    assert not trimmer.maybe_trim()
    now[0] += 1
    assert trimmer.maybe_trim() and trimmer.trims == 2


@glibc
def test_memory_freed_between_live_blocks_goes_back_to_the_os():
    # 96 MB of 64 KB blocks on the heap (below glibc's mmap threshold), every 16th kept: the freed
    # ones lie between live blocks, where glibc keeps them resident for reuse until trimmed.
    process = psutil.Process()
    blocks = [np.ones(64 * 1024, dtype=np.uint8) for _ in range(1536)]
    kept = blocks[::16]
    del blocks
    before = process.memory_info().rss
    now = [0.0]
    trimmer = HeapTrimmer(interval_s=1, clock=lambda: now[0])
    now[0] = 1.0
    assert trimmer.maybe_trim()
    released = before - process.memory_info().rss
    assert released > 40 * 2**20, f"released {released / 2**20:.1f} MB"
    assert all(int(b[0]) == 1 for b in kept)  # the live blocks are untouched


def test_the_arena_cap_keeps_an_operators_own_setting():
    assert allocator_env({}) == {"MALLOC_ARENA_MAX": "2"}
    assert allocator_env({"MALLOC_ARENA_MAX": "4"}) == {"MALLOC_ARENA_MAX": "4"}
