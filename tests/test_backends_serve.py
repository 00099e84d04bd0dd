"""The a1111 and openai backends against a real `imagefab serve` on the tiny models: its A1111 and
OpenAI dialects are real servers. One server for the module; a wrong key and a farm with a dead
member against it."""

from __future__ import annotations

from dataclasses import replace

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


def test_bulk_run_on_a1111_catalogs_lineage_and_qc(serve_url, tmp_path):
    """The example spec, one line changed: rendered by `imagefab serve`'s A1111 dialect, then the same
    QC, post-processing and catalog; regenerate says plainly it cannot promise the bytes."""
    from app.catalog.store import CatalogStore
    from app.regenerate import RegenerateError, regenerate
    from app.spec import load_spec
    from app.storage import OutputStore
    from jobs.generate import run

    key_file = tmp_path / "serve.key"
    key_file.write_text(KEY + "\n")
    spec = load_spec(
        "specs/ecommerce.yaml",
        {
            "output.uri": str(tmp_path / "out"),
            "input.limit": 2,
            "steps": 2,
            "model.backend": "a1111",
            "model.endpoints": [serve_url],
            # A secret file: Ray's actors read it where they run (this Ray started before the variable was set).
            "model.credentials": f"file:{key_file}",
        },
    )
    summary = run(spec, quiet=True)
    rows = CatalogStore(OutputStore.at(str(tmp_path / "out"))).read().to_pylist()
    assert len(rows) == 4 and summary.rendered == 4
    for row in rows:
        assert row["status"] in ("accepted", "review", "rejected"), row["error"]
        assert row["sharpness"] is not None and row["phash"] and row["uri"]  # QC and the master file
        b = row["backend"]
        assert b["name"] == "a1111" and b["endpoint_host"] == serve_url.removeprefix("http://")
        assert b["provider_model"] == "tiny-sdxl" and b["seed"] == row["seed"] and b["reproducible"] is False
        assert b["unhonoured"] == ["loras"]  # the spec's LoRA is not sent to an A1111 server
        assert row["accelerator"] == "api:a1111" and row["gpu_seconds"] == 0.0
        assert KEY not in str(row)
    with pytest.raises(RegenerateError, match="is not reproducible: it was rendered by the a1111 backend"):
        regenerate(rows[0]["image_id"], str(tmp_path / "out"))


def test_bulk_run_with_a_wrong_key_stops_before_rendering(serve_url, monkeypatch, tmp_path):
    from app.spec import SpecError, load_spec
    from jobs.generate import run

    monkeypatch.setenv("IMAGEFAB_TEST_SERVE_KEY", "wrong-key-0123456789abcdef")
    spec = load_spec(
        "specs/ecommerce.yaml",
        {
            "output.uri": str(tmp_path / "out"),
            "input.limit": 1,
            "model.backend": "a1111",
            "model.endpoints": [serve_url],
            "model.credentials": "env:IMAGEFAB_TEST_SERVE_KEY",
        },
    )
    with pytest.raises(SpecError, match="refused the credentials .*HTTP 401.*Nothing was rendered") as e:
        run(spec, quiet=True)
    assert "wrong-key" not in str(e.value)
    assert not list((tmp_path / "out").glob("images/*/*.png"))


def test_a_cost_cap_stops_submitting_to_a_backend_at_the_image_that_would_cross_it(serve_url, tmp_path):
    from app.catalog.store import CatalogStore
    from app.spec import load_spec
    from app.storage import OutputStore
    from jobs.generate import run

    key_file = tmp_path / "serve.key"
    key_file.write_text(KEY + "\n")
    overrides = {
        "output.uri": str(tmp_path / "out"),
        "input.limit": 2,
        "steps": 2,
        "model.backend": "a1111",
        "model.endpoints": [serve_url],
        "model.credentials": f"file:{key_file}",
        "model.price_usd_per_image": 0.01,
        "budget.max_cost_usd": 0.025,  # two images fit, a third would cross it
    }
    summary = run(load_spec("specs/ecommerce.yaml", overrides), quiet=True)
    assert summary.stopped_on_budget and summary.budget["admitted_images"] == 2
    rows = CatalogStore(OutputStore.at(str(tmp_path / "out"))).read().to_pylist()
    rendered = [r for r in rows if r["status"] != "failed"]
    assert len(rendered) == 2 and sum(r["cost_usd"] for r in rendered) == pytest.approx(
        0.02, abs=0.001
    )  # + QC CPU time
    stopped = [r for r in rows if r["status"] == "failed"]
    assert len(stopped) == 2 and all(r["error"].startswith("budget_exhausted: ") for r in stopped)
    assert "cost cap $0.025" in summary.render()


def test_image_inputs_through_the_a1111_and_openai_backends_keep_the_product(serve_url, serve_key):
    """A bulk row's inpaint and img2img sent to `imagefab serve` as a remote A1111 (img2img) and
    OpenAI (images/edits) server; the answers are finished like the generator's own."""
    from test_backends import conditioned_requests

    inpaint, img2img = conditioned_requests(
        [
            {"product": "a coin", "image": "data/packshots/coin.png"},
            {"product": "a coin", "image": "data/packshots/coin.png", "mode": "img2img", "strength": 0.5},
        ],
        steps=4,
    )
    img2img = replace(img2img, width=64, height=64)
    common = {"credentials": "env:IMAGEFAB_TEST_SERVE_KEY", "backoff_s": 0.05, "max_backoff_s": 0.2}
    a1111 = build_backend(BackendConfig(backend="a1111", endpoints=(serve_url,), **common))
    openai = build_backend(BackendConfig(backend="openai", endpoints=(serve_url,), model="tiny-sdxl", **common))
    for backend in (a1111, openai):
        done = backend.render([inpaint, img2img])
        assert [r.error for r in done] == [None, None], [str(r.error) for r in done]
        kept, plain = done
        assert kept.image.shape == (inpaint.height, inpaint.width, 3) and plain.image.shape == (64, 64, 3)
        assert kept.measures.kept_mean_abs == 0.0 and kept.measures.kept_pixels > 1000
    assert "strength" in done[1].lineage.unhonoured  # OpenAI's edits take no strength
