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
