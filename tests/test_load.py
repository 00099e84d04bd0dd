"""A short run of benchmarks/load.py in CI: under the in-flight bound nothing fails; over it the
excess is refused at once with 503 (never a timeout or another error). About 10 s of load."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

LOAD = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
BOUND = 3
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def load():
    spec = importlib.util.spec_from_file_location("load_benchmark", LOAD)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_benchmark"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_url(ray_local, load, tmp_path_factory):
    from ray import serve

    url = load.start_server(BOUND, output=str(tmp_path_factory.mktemp("load-out")))
    load.run_level(url, 1, 2.0)  # warm-up: the first request loads the LoRA-free pipeline state
    yield url
    serve.shutdown()


def test_below_the_bound_nothing_fails(load, base_url):
    r = load.run_level(base_url, BOUND - 1, 5.0, timeout=60)
    assert r.errors == 0 and len(r.ok_latencies) >= BOUND - 1, load.markdown([r], BOUND)


def test_above_the_bound_the_excess_gets_503_not_timeouts(load, base_url):
    r = load.run_level(base_url, 2 * BOUND, 5.0, timeout=60)
    assert r.busy > 0 and not r.other and r.ok_latencies, load.markdown([r], BOUND)
