"""The a1111 and openai backends against a real `imagefab serve` on the tiny models: its A1111 and
OpenAI dialects are real servers. One server for the module; a wrong key and a farm with a dead
member against it."""

from __future__ import annotations

import numpy as np
import pytest
from ports import free_port
from test_backends import request

from app.backends import BackendConfig, BackendError, build_backend
from app.backends.a1111 import A1111Backend
from app.backends.openai_images import OpenAIImagesBackend
from app.serve.config import load_serve_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEY = "serve-key-0123456789abcdef"


@pytest.fixture(scope="module")
def serve_url(ray_local, tmp_path_factory):
    from ray import serve

    from app.serve.app import build_app

    port = free_port()
    config = load_serve_config(
        None, output_uri=str(tmp_path_factory.mktemp("serve-out")), port=port, steps=2, api_keys=[KEY]
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-backends", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def serve_key(monkeypatch):
    monkeypatch.setenv("IMAGEFAB_TEST_SERVE_KEY", KEY)


def tiny(i: int):
    return request(i, width=64, height=64, steps=2, guidance=5.0, scheduler="euler")


def test_a1111_backend_renders_on_a_farm_with_a_dead_member(serve_url, serve_key):
    dead = f"http://127.0.0.1:{free_port()}"
    config = BackendConfig(
        backend="a1111",
        endpoints=(dead, serve_url),
        credentials="env:IMAGEFAB_TEST_SERVE_KEY",
        max_concurrency=2,
        backoff_s=0.05,
        max_backoff_s=0.2,
        cooldown_s=60,
    )
    backend = build_backend(config)
    assert isinstance(backend, A1111Backend)
    backend.preflight()  # the dead one sits out; the live one accepts the key
    assert backend.pool.healthy() == [serve_url]
    results = backend.render([tiny(0), tiny(1)])
    for r, i in zip(results, (0, 1), strict=True):
        assert r.ok, r.error
        assert r.image is not None and r.image.shape == (64, 64, 3) and r.image.dtype == np.uint8
        lin = r.lineage
        assert lin.backend == "a1111" and lin.endpoint_host == serve_url.removeprefix("http://")
        assert lin.seed == 1234 + i and lin.provider_model == "tiny-sdxl" and lin.reproducible is False
    # The A1111 dialect honours the seed: the same request, the same pixels from this server.
    [again] = backend.render([tiny(0)])
    assert again.image is not None and np.array_equal(again.image, results[0].image)


def test_openai_backend_renders_and_records_unhonoured_fields(serve_url, serve_key):
    config = BackendConfig(backend="openai", endpoints=(serve_url,), credentials="env:IMAGEFAB_TEST_SERVE_KEY")
    backend = build_backend(config)
    assert isinstance(backend, OpenAIImagesBackend)
    backend.preflight()
    [r] = backend.render([tiny(3)])
    assert r.ok, r.error
    assert r.image is not None and r.image.shape == (64, 64, 3)
    assert r.lineage.seed is None and r.lineage.reproducible is False
    assert {"seed", "steps", "guidance", "negative_prompt"} <= set(r.lineage.unhonoured)
    assert r.cost_usd == pytest.approx(0.04)


@pytest.mark.parametrize("kind", ["a1111", "openai"])
def test_wrong_key_stops_before_rendering(serve_url, monkeypatch, kind):
    monkeypatch.setenv("IMAGEFAB_TEST_SERVE_KEY", "wrong-key-0123456789abcdef")
    backend = build_backend(
        BackendConfig(backend=kind, endpoints=(serve_url,), credentials="env:IMAGEFAB_TEST_SERVE_KEY")
    )
    with pytest.raises(BackendError) as e:
        backend.preflight()
    assert e.value.kind == "auth" and e.value.status == 401 and "wrong-key" not in str(e.value)
