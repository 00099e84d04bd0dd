"""The Serve app over real HTTP on a local Ray with the tiny models: every endpoint, batching,
multiplexing, API keys, limits, backpressure, the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest
from PIL import Image
from ports import free_port

from app.postprocess import parse_infotext, read_metadata
from app.serve.config import ServeConfig, load_serve_config
from app.spec import SpecError

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from app.serve.app import build_app

    port = free_port()
    out = tmp_path_factory.mktemp("serve-out")
    config = load_serve_config(
        None,
        output_uri=str(out),
        port=port,
        steps=3,
        api_keys=[KEY],
        combinations={
            "default": {"loras": [{"name": "tiny-style", "weight": 0.8}]},
            "plain": {},
            "fast": {"scheduler": "euler_trailing", "steps": 2, "guidance": 1.0},
        },
        # A long batch window so concurrent test requests reliably share generator calls.
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.5},
        limits={"max_in_flight": 3, "max_images": 4, "max_prompt_chars": 200, "max_body_bytes": 200_000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-test", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    yield client, port, out
    client.close()
    serve.shutdown()


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def stats(client) -> dict:
    return client.get("/v1/stats").json()["generators"]["tiny-sdxl"]


def test_health_docs_and_keys(server):
    _client, port, _ = server
    anon = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    assert anon.get("/healthz").json()["status"] == "ok"  # health needs no key
    assert "/v1/images/generations" in anon.get("/openapi.json").json()["paths"]
    r = anon.post("/v1/generate", json={"prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = anon.post("/v1/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert r.status_code == 401
    assert anon.get("/metrics").status_code == 401


def test_native_generate_returns_catalogued_images_with_metadata(server):
    from app.catalog.store import CatalogStore
    from app.regenerate import regenerate
    from app.storage import OutputStore

    client, _, out = server
    r = client.post("/v1/generate", json={"prompt": "a red shoe", "n": 2, "seed": 42, "tags": {"sku": "S1"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["combination"] == "default" and [im["seed"] for im in body["images"]] == [42, 43]
    for im in body["images"]:
        assert im["status"] in ("accepted", "review", "rejected") and "sharpness" in im["scores"]
        data = base64.b64decode(im["b64_json"])
        assert Image.open(io.BytesIO(data)).size == (256, 256)
        info = parse_infotext(read_metadata(data)["parameters"])
        assert info["prompt"] == "a red shoe <lora:tiny-style:0.8>"  # A1111 writes the stack into the prompt
        assert info["seed"] == im["seed"] and info["image_id"] == im["image_id"]
        assert info["loras"] == [("tiny-style", 0.8)]
    rows = {row["image_id"]: row for row in CatalogStore(OutputStore.at(str(out))).read().to_pylist()}
    row = rows[body["images"][0]["image_id"]]
    assert row["source"] == "serve" and dict(row["tags"])["sku"] == "S1" and row["combination"] == "default"
    assert row["run_id"].startswith("serve-")
    # A served image is as reproducible as a bulk one.
    assert regenerate(row["image_id"], str(out)).identical


def test_concurrent_requests_share_generator_calls(server):
    client, _, _ = server
    before = stats(client)
    results = []

    def call(i):
        results.append(
            client.post("/v1/generate", json={"prompt": f"a hat number {i}", "seed": i, "combination": "plain"})
        )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    after = stats(client)
    assert after["images"] - before["images"] == 3
    assert after["calls"] - before["calls"] < 3  # batched: fewer generator calls than requests


def test_combinations_are_multiplexed_and_differ(server):
    client, _, _ = server
    a = client.post("/v1/generate", json={"prompt": "a mug", "seed": 7, "combination": "default"}).json()
    b = client.post("/v1/generate", json={"prompt": "a mug", "seed": 7, "combination": "plain"}).json()
    c = client.post("/v1/generate", json={"prompt": "a mug", "seed": 7, "combination": "fast"}).json()
    ids = {x["images"][0]["image_id"] for x in (a, b, c)}
    assert len(ids) == 3
    seen = stats(client)["combinations"]
    assert {"tiny-sdxl|tiny-style@0.8", "tiny-sdxl|"} <= set(seen)
    models = client.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"default", "plain", "fast"}


def test_openai_client_gets_b64_and_urls(server):
    import openai

    client, port, _ = server
    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    res = oa.images.generate(model="plain", prompt="a lamp", n=2, size="256x256", response_format="b64_json")
    assert len(res.data) == 2 and png_of(res.data[0].b64_json).size == (256, 256)
    res = oa.images.generate(model="plain", prompt="a lamp", n=1, size="192x256", response_format="url")
    img = client.get(res.data[0].url.replace(f"http://127.0.0.1:{port}", ""))
    assert img.status_code == 200 and Image.open(io.BytesIO(img.content)).size == (192, 256)
    with pytest.raises(openai.NotFoundError):
        oa.images.generate(model="no-such-model", prompt="a lamp")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="nope-nope-nope-nope", max_retries=0
        ).images.generate(model="plain", prompt="a lamp")


def test_a1111_txt2img_and_friends(server):
    client, _, _ = server
    r = client.post(
        "/sdapi/v1/txt2img",
        json={
            "prompt": "a castle <lora:tiny-detail:0.5>",
            "negative_prompt": "blurry",
            "seed": 11,
            "steps": 2,
            "cfg_scale": 6,
            "width": 256,
            "height": 192,
            "batch_size": 2,
            "n_iter": 1,
            "sampler_name": "Euler a",
            "override_settings": {"sd_model_checkpoint": "tiny-sdxl [e0979b9d95]"},
            "enable_hr": False,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and info["all_seeds"] == [11, 12] and info["sampler_name"] == "Euler a"
    assert png_of(body["images"][0]).size == (256, 192)
    parsed = parse_infotext(info["infotexts"][0])
    assert (
        parsed["negative_prompt"] == "blurry"
        and parsed["cfg_scale"] == 6.0
        and parsed["loras"] == [("tiny-detail", 0.5)]
    )
    png = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + body["images"][0]}).json()
    assert png["parameters"]["seed"] == 11 and png["info"].startswith("a castle")
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["tiny-sdxl"]
    assert {"tiny-style", "tiny-detail"} <= {lo["name"] for lo in client.get("/sdapi/v1/loras").json()}
    assert {"Euler", "Euler a", "DPM++ 2M Karras"} <= {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prompt": "x" * 300}, 422, "prompt"),
        ({"prompt": "x", "n": 5}, 422, "n"),
        ({"prompt": "x", "width": 250, "height": 256}, 422, "size"),
        ({"prompt": "x", "width": 4096, "height": 4096}, 422, "size"),
        ({"prompt": "x", "combination": "nope"}, 404, "model"),
        ({"prompt": "x", "loras": [{"name": "tiny-ghost", "weight": 1}]}, 404, "loras"),
        ({"prompt": "x", "loras": [{"name": "tiny-style", "weight": 9}]}, 422, "loras"),
        ({"prompt": "x", "scheduler": "warp"}, 422, "scheduler"),
        ({"prompt": "  "}, 422, "prompt"),
    ],
)
def test_limits_and_unknown_models_are_4xx_naming_the_field(server, body, status, field):
    client, _, _ = server
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == field


def test_schema_errors_oversized_bodies_and_a1111_samplers(server):
    client, _, _ = server
    r = client.post("/v1/generate", json={"prompt": "x", "n": "many"})
    assert r.status_code == 422 and "n" in json.dumps(r.json())
    r = client.post("/sdapi/v1/png-info", json={"image": "A" * 300_000})
    assert r.status_code == 413
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Warp Drive"})
    assert r.status_code == 422 and "sampler" in r.text
    r = client.post("/sdapi/v1/png-info", json={"image": "bm90IGFuIGltYWdl"})
    assert r.status_code == 422


def test_backpressure_answers_503_with_retry_after(server):
    client, _, _ = server
    results = []

    def call(i):
        results.append(client.post("/v1/generate", json={"prompt": f"slow {i}", "steps": 25, "combination": "plain"}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    busy = next(r for r in results if r.status_code == 503)
    assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["error"]["message"]


def test_metrics_count_requests_images_and_qc(server):
    client, _, _ = server
    text = client.get("/metrics").text
    assert 'imagefab_http_requests_total{route="/v1/generate",status="200"}' in text
    assert "imagefab_images_total" in text and "imagefab_qc_outcomes_total" in text
    assert "imagefab_backpressure_rejections_total" in text and "imagefab_requests_in_flight" in text


def test_config_refuses_a_public_address_without_keys(monkeypatch):
    monkeypatch.delenv("IMAGEFAB_API_KEYS", raising=False)
    with pytest.raises(SpecError, match="needs API keys"):
        ServeConfig(host="0.0.0.0").check_bind()
    ServeConfig(host="0.0.0.0", api_keys=("k" * 20,)).check_bind()
    monkeypatch.setenv("IMAGEFAB_API_KEYS", "from-the-environment-123")
    ServeConfig(host="0.0.0.0").check_bind()
    with pytest.raises(SpecError, match="at least 16 characters"):
        load_serve_config(None, api_keys=["short"])
    with pytest.raises(SpecError, match="default_combination: no combination 'x'"):
        load_serve_config(None, default_combination="x")
