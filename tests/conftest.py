"""Shared fixtures: the tiny offline models (built once into a cache), a temp output, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Built once per checkout and reused: building the tiny models takes ~20 s.
os.environ.setdefault("IMAGEFAB_HOME", str(REPO / ".imagefab" / "test-home"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_catalog():
    from app.models.catalog import ModelCatalog

    return ModelCatalog.load()


@pytest.fixture(scope="session")
def tiny_base(model_catalog):
    return model_catalog.resolve_base("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_loras(model_catalog, tiny_base):
    return {n: model_catalog.resolve_lora(n, tiny_base) for n in ("tiny-style", "tiny-detail")}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 CPUs, a small object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        # address="local": never a cluster recorded by an earlier `ray start` (dead or alive).
        ray.init(
            address="local", num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False
        )
    yield ray
    ray.shutdown()


# The files that take longest (seconds of `make test` on 2 cores; "cold": a fresh clone, whose
# compile cache is empty), started first, longest first: with `--dist loadfile` a worker runs a
# whole file, and xdist's own order (most tests first) would leave these few-test, many-minute files
# for the end, where one of them on one worker sets the wall time while the other worker idles.
# Started first, the short files fill in around them. test_gpu_bench first of all: it compiles the
# graphs that test_compiled_generator (its FP8 row's) and test_attention (its compiled row's and
# its math row's) then load from the tests' compile cache; a file that reaches one of those
# compiles while the other is at it waits for it (the Generator's warm-up lock) rather than
# compiling it again, so these two come late enough to find the graphs there.
SLOWEST_FILES = (
    "test_gpu_bench.py",  # ~310 s cold (~1100 s cold beside the other compile-heavy files, busy machine)
    "test_asyncjobs_serve.py",  # ~360 s: a Ray head and Serve, restarted and killed mid-job
    "test_faults.py",  # ~230 s, ~320 s cold: bulk jobs killed and rerun
    "test_s3_outage.py",  # ~190 s: a store outage under a running job
    "test_job.py",  # ~110 s of setup: a partial run and its resume
    "test_compiled_generator.py",  # ~115 s of setup where it compiles (cold, and test_gpu_bench not yet run)
    "test_fuzz.py",  # ~90 s: the HTTP API fuzzed on Serve
    "test_asyncjobs_ray.py",  # ~90 s
    "test_multinode.py",  # ~85 s: a two-node cluster
    "test_raycluster.py",  # ~75 s
    "test_registry.py",  # ~70 s
    "test_s3.py",  # ~65 s
    "test_attention.py",  # ~30 s once test_gpu_bench's rows are compiled, ~240 s where it compiles them
)


def pytest_collection_modifyitems(config, items):
    """Files in SLOWEST_FILES order first, then files with a slow test, then the rest as collected
    (xdist schedules files in this order with --no-loadscope-reorder; see the Makefile)."""
    slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        if name in SLOWEST_FILES:
            return (0, SLOWEST_FILES.index(name))
        return (1 if name in slow_files else 2, 0)

    items.sort(key=rank)  # stable: tests keep their order within a file, and files their collection order
