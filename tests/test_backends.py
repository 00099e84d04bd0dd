"""Remote generator backends over real loopback HTTP: Stability against a server true to its v2beta
contract, faults (slow, 500 bursts, 429 + Retry-After, refused connections, malformed bodies, a
wrong key), credentials kept out of errors. The a1111 and openai backends against `imagefab serve`
are in test_backends_serve.py."""

from __future__ import annotations

import pickle
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from ports import free_port
from stability_stub import StabilityStub

from app.backends import BackendConfig, BackendError, build_backend
from app.backends.a1111 import A1111Backend, EndpointPool
from app.backends.credentials import CredentialError, load_secret, redact
from app.backends.stability import StabilityBackend, nearest_aspect_ratio
from app.request import LoraRef, RenderRequest, requests_to_numpy

KEY = "sk-test-0123456789abcdef0123456789"


def request(i: int = 0, prompt: str = "a red mug on a table", **over: Any) -> RenderRequest:
    base = RenderRequest(
        image_id=f"{i:032x}",
        prompt=prompt,
        negative_prompt="blurry",
        base_model={"name": "tiny-sdxl", "version": "1", "sha256": "0" * 64, "source": ""},
        loras=(),
        scheduler="euler",
        steps=20,
        guidance=6.5,
        width=768,
        height=512,
        seed=1234 + i,
    )
    return replace(base, **over)


def fast(url: str, **over: Any) -> BackendConfig:
    """A stability backend config with short backoff, so fault tests take fractions of a second."""
    base = BackendConfig(
        backend="stability",
        endpoints=(url,),
        credentials="env:IMAGEFAB_TEST_STABILITY_KEY",
        backoff_s=0.05,
        max_backoff_s=0.2,
    )
    return replace(base, **over)


@pytest.fixture
def stability_key(monkeypatch):
    monkeypatch.setenv("IMAGEFAB_TEST_STABILITY_KEY", KEY)
    return KEY


@pytest.mark.parametrize("accept", ["image/*", "application/json"])
def test_stability_renders_with_lineage_in_both_answer_forms(stability_key, accept):
    with StabilityStub(KEY) as stub:
        backend = StabilityBackend(fast(stub.url, model="core"), accept=accept)
        [result] = backend.render([request()])
        assert result.ok, result.error
        assert result.image is not None and result.image.dtype == np.uint8 and result.image.shape == (64, 96, 3)
        lin = result.lineage
        assert (lin.backend, lin.provider_model, lin.seed, lin.reproducible) == ("stability", "core", 1234, False)
        assert lin.endpoint_host == stub.url.removeprefix("http://") and len(lin.request_id or "") == 32
        assert {"steps", "scheduler", "guidance"} <= set(lin.unhonoured)
        assert result.cost_usd == pytest.approx(0.03)
        sent = stub.state.requests[0]
        assert sent["accept"] == accept
        assert sent["fields"] == {
            "prompt": "a red mug on a table",
            "negative_prompt": "blurry",
            "aspect_ratio": "3:2",
            "seed": "1234",
            "output_format": "png",
        }


def test_stability_sd3_sends_model_and_cfg_scale(stability_key):
    with StabilityStub(KEY) as stub:
        backend = StabilityBackend(fast(stub.url, model="sd3.5-medium"))
        [result] = backend.render([request(width=512, height=512)])
        assert result.ok and result.lineage.provider_model == "sd3.5-medium"
        sent = stub.state.requests[0]
        assert sent["engine"] == "sd3"
        assert sent["fields"]["model"] == "sd3.5-medium" and sent["fields"]["cfg_scale"] == "6.5"
        assert sent["fields"]["mode"] == "text-to-image" and sent["fields"]["aspect_ratio"] == "1:1"
        assert "guidance" not in result.lineage.unhonoured


@pytest.mark.parametrize("accept", ["image/*", "application/json"])
def test_content_filtered_is_a_failed_row_with_the_providers_reason(stability_key, accept):
    with StabilityStub(KEY) as stub:
        backend = StabilityBackend(fast(stub.url), accept=accept)
        ok, refused = backend.render([request(0), request(1, prompt="a forbidden thing")])
        assert ok.ok
        assert refused.image is None and refused.error is not None
        assert refused.error.kind == "refused" and "CONTENT_FILTERED" in refused.error.message
        assert refused.attempts <= 1 and len(stub.state.requests) == 2  # a refusal is not retried


def test_wrong_key_stops_at_preflight_and_never_leaks(monkeypatch):
    monkeypatch.setenv("IMAGEFAB_TEST_STABILITY_KEY", "sk-wrong-key-abcdef0123456789")
    with StabilityStub(KEY) as stub:
        backend = StabilityBackend(fast(stub.url))
        with pytest.raises(BackendError) as e:
            backend.preflight()
        assert e.value.kind == "auth" and e.value.status == 401 and "invalid API key" in str(e.value)
        assert "sk-wrong" not in str(e.value)
        with pytest.raises(BackendError) as e2:  # render raises too: auth stops the run, not one row
            backend.render([request()])
        assert e2.value.kind == "auth"
        assert stub.state.posts == 1  # not retried


def test_out_of_credits_is_402_and_stops(stability_key):
    with StabilityStub(KEY, credits=3) as stub:
        backend = StabilityBackend(fast(stub.url))
        backend.preflight()
        [first] = backend.render([request(0)])
        assert first.ok
        with pytest.raises(BackendError) as e:
            backend.render([request(1)])
        assert e.value.status == 402 and "credits" in e.value.message
        with pytest.raises(BackendError, match="no credits left"):
            backend.preflight()


def test_429_retry_after_is_honoured(stability_key):
    with StabilityStub(KEY, rate_limited=1, retry_after_s=1) as stub:
        backend = StabilityBackend(fast(stub.url))
        [result] = backend.render([request()])
        assert result.ok and result.attempts == 2
        first, second = stub.state.requests
        assert second["t"] - first["t"] >= 0.95  # waited Retry-After, not the 0.05 s backoff


def test_burst_of_500s_is_retried_then_gives_up(stability_key):
    with StabilityStub(KEY, fail_500=2) as stub:
        [result] = StabilityBackend(fast(stub.url, max_attempts=3)).render([request()])
        assert result.ok and result.attempts == 3
    with StabilityStub(KEY, fail_500=5) as stub:
        [result] = StabilityBackend(fast(stub.url, max_attempts=3)).render([request()])
        assert result.error is not None and result.error.kind == "transient" and "HTTP 500" in result.error.message
        assert len(stub.state.requests) == 3


def test_malformed_image_body_is_a_bad_response_row(stability_key):
    with StabilityStub(KEY, malformed=1) as stub:
        bad, good = StabilityBackend(fast(stub.url, max_concurrency=1)).render([request(0), request(1)])
        assert bad.error is not None and bad.error.kind == "bad_response" and "not a readable image" in str(bad.error)
        assert good.ok


def test_slow_backend_concurrency_is_bounded(stability_key):
    with StabilityStub(KEY, delay_s=0.4) as stub:
        backend = StabilityBackend(fast(stub.url, max_concurrency=2))
        start = time.perf_counter()
        results = backend.render([request(i) for i in range(4)])
        took = time.perf_counter() - start
        assert all(r.ok for r in results) and [r.image_id for r in results] == [request(i).image_id for i in range(4)]
        assert 0.75 < took < 3.0  # 4 requests, 2 at a time, 0.4 s each: two rounds
        # A timeout shorter than the delay: transient, retried, then a failed row.
        [late] = StabilityBackend(fast(stub.url, timeout_s=0.1, max_attempts=2)).render([request(9)])
        assert late.error is not None and late.error.kind == "transient" and "Timeout" in late.error.message


def test_connection_refused_fails_the_row_after_retries(stability_key):
    closed = f"http://127.0.0.1:{free_port()}"
    [result] = StabilityBackend(fast(closed, max_attempts=2)).render([request()])
    assert result.error is not None and result.error.kind == "transient" and "ConnectError" in result.error.message
    assert result.attempts == 2


def test_a1111_farm_takes_a_dead_endpoint_out():
    dead = f"http://127.0.0.1:{free_port()}"
    config = BackendConfig(backend="a1111", endpoints=(dead,), backoff_s=0.01, max_backoff_s=0.02, max_attempts=2)
    backend = A1111Backend(config)
    with pytest.raises(BackendError, match="none of 1 endpoints answered"):
        backend.preflight()
    [row] = backend.render([request()])
    assert row.error is not None and row.error.kind == "transient"
    pool = EndpointPool(("http://a:1", "http://b:1", "http://c:1"), cooldown_s=0.2)
    assert [pool.pick() for _ in range(4)] == ["http://a:1", "http://b:1", "http://c:1", "http://a:1"]
    pool.mark_down("http://b:1")
    assert [pool.pick() for _ in range(3)] == ["http://c:1", "http://a:1", "http://c:1"]
    time.sleep(0.25)  # the cool-down is over: b is tried again
    assert "http://b:1" in {pool.pick() for _ in range(3)}


def test_credentials_from_env_or_file_never_printed(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEFAB_TEST_KEY", KEY)
    secret = load_secret("env:IMAGEFAB_TEST_KEY")
    assert secret is not None and secret.reveal() == KEY
    assert KEY not in repr(secret) and KEY not in f"{secret}" and KEY not in str([secret])
    again = pickle.loads(pickle.dumps(secret))  # crosses into an actor as its reference
    assert KEY.encode() not in pickle.dumps(secret) and again is not None and again.reveal() == KEY
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    file_secret = load_secret(f"file:{path}")
    assert file_secret is not None and file_secret.reveal() == KEY
    assert redact(f"bad key {KEY} given", secret) == "bad key **** given"
    with pytest.raises(CredentialError, match="IMAGEFAB_NOT_SET is not set"):
        load_secret("env:IMAGEFAB_NOT_SET")
    with pytest.raises(CredentialError, match="cannot read secret file"):
        load_secret(f"file:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="never the key itself"):
        BackendConfig(backend="stability", credentials=KEY)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="backend must be one of"):
        BackendConfig(backend="midjourney")
    with pytest.raises(ValueError, match="a1111 needs endpoints"):
        BackendConfig(backend="a1111")
    with pytest.raises(ValueError, match="not an http"):
        BackendConfig(backend="a1111", endpoints=("127.0.0.1:7860",))
    with pytest.raises(ValueError, match="max_concurrency"):
        BackendConfig(backend="openai", max_concurrency=0)
    with pytest.raises(ValueError, match="stability model must be one of"):
        build_backend(BackendConfig(backend="stability", model="sdxl-9", credentials="env:PATH"))


def test_aspect_ratio_and_lora_fields_unhonoured(stability_key):
    assert nearest_aspect_ratio(1024, 1024) == "1:1" and nearest_aspect_ratio(1344, 768) == "16:9"
    assert nearest_aspect_ratio(640, 1536) == "9:21"
    lora = LoraRef(name="tiny-style", version="1", weight=0.8, sha256="1" * 64)
    with StabilityStub(KEY) as stub:
        [r] = StabilityBackend(fast(stub.url)).render([request(loras=(lora,))])
        assert "loras" in r.lineage.unhonoured


def test_spec_backend_fields_are_validated_where_they_are_set():
    from app.spec import SpecError, load_spec

    spec = load_spec("specs/ecommerce.yaml", {"model.backend": "a1111", "model.endpoints": ["http://127.0.0.1:8000"]})
    config = spec.effective_combinations()["default"].backend_config()
    assert (config.backend, config.endpoints) == ("a1111", ("http://127.0.0.1:8000",))
    assert load_spec("specs/ecommerce.yaml").effective_combinations()["default"].backend == "diffusers"
    for overrides, message in [
        ({"model.backend": "a1111"}, "a1111 needs endpoints"),
        ({"model.backend": "stability", "model.credentials": KEY}, "never the key itself"),
        ({"model.endpoints": ["http://127.0.0.1:1"]}, "need a remote backend"),
        ({"model.backend": "stability", "model.provider_model": "sdxl-9"}, "stability model must be one of"),
        ({"model.backend": "dalle"}, "model.backend"),
    ]:
        with pytest.raises(SpecError, match=message) as e:
            load_spec("specs/ecommerce.yaml", overrides)
        assert KEY not in str(e.value)


def test_remote_generator_stage_adds_the_generators_columns_and_lineage(stability_key):
    """The Ray Data callable, called directly: pixels at the requested size, a refused row failed
    with the provider's reason, rows not pending passed through."""
    import json

    from app.backends.stage import RemoteGenerator

    reqs = [request(0, width=96, height=64), request(1, prompt="a forbidden thing"), request(2)]
    batch = {
        "image_id": np.array([r.image_id for r in reqs], dtype=object),
        "status": np.array(["pending", "pending", "failed"], dtype=object),
        "error": np.array(["", "", "bad_row: earlier"], dtype=object),
        "request": requests_to_numpy(reqs),
    }
    with StabilityStub(KEY) as stub:
        out = RemoteGenerator(fast(stub.url))(batch)
    assert list(out["status"]) == ["pending", "failed", "failed"]
    assert "CONTENT_FILTERED" in out["error"][1] and out["error"][2] == "bad_row: earlier"
    assert len(out["pixels"][0]) == 64 * 96 * 3 and out["pixels"][1] == b"" and out["pixels"][2] == b""
    for column in ("nonfinite", "gpu_seconds", "accelerator", "batch_id", "batch_size", "generator_id"):
        assert len(out[column]) == 3
    lineage = json.loads(out["backend"][0])
    assert lineage["name"] == "stability" and lineage["seed"] == 1234 and lineage["api_cost_usd"] == 0.03
    assert out["backend"][2] == ""


def conditioned_requests(rows: list[dict], steps: int = 20) -> list[RenderRequest]:
    """Image-conditioned requests as a spec's rows make them (app/expand.py), from the packshots."""
    from pathlib import Path

    import pyarrow as pa

    from app.expand import ExpandRows, ResolvedModels
    from app.models.catalog import ResolvedModel
    from app.request import requests_from_column
    from app.spec import parse_spec

    specs = Path(__file__).resolve().parents[1] / "specs"
    base = ResolvedModel(name="tiny-sdxl", kind="base", arch="sdxl", version="1", sha256="0" * 64, path="", source="")
    spec = parse_spec(
        {
            "run_name": "remote-modes",
            "input": {"path": "/rows.csv", "prompt_template": "{product} on a marble table"},
            "steps": steps,
            "size": "small-square",
            "image": {"mode": "inpaint", "base_dir": str(specs)},
        }
    )
    columns = ("product", "image", "mask", "mode", "strength", "target")
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    out = ExpandRows(spec, ResolvedModels.single(base))(table)
    assert out.column("status").to_pylist() == ["pending"] * len(rows), out.column("error").to_pylist()
    return requests_from_column(out["request"])


def test_stability_maps_every_image_mode_to_its_endpoint_and_keeps_the_product(stability_key):
    reqs = conditioned_requests(
        [
            {"product": "a coin", "image": "data/packshots/coin.png"},  # alpha mask → edit/inpaint
            {
                "product": "a cup",
                "image": "data/packshots/coffee_cup.png",
                "mask": "data/packshots/coffee_cup_mask.png",
            },
            {"product": "a cup", "image": "data/packshots/coffee_cup_mask.png", "mode": "outpaint", "target": "9:16"},
            {"product": "a coin", "image": "data/packshots/coin.png", "mode": "img2img", "strength": 0.5},
            {"product": "a coin", "image": "data/packshots/coin.png", "mode": "upscale"},
        ]
    )
    with StabilityStub(KEY) as stub:
        results = StabilityBackend(fast(stub.url, model="sd3", max_concurrency=1)).render(reqs)
        sent = {r["engine"]: r for r in stub.state.requests}
    assert [r.error for r in results] == [None] * 5
    assert sorted(sent) == ["edit/inpaint", "edit/outpaint", "sd3", "upscale/conservative"]
    assert (
        set(sent["edit/inpaint"]["files"]) == {"image", "mask"} and sent["edit/inpaint"]["fields"]["grow_mask"] == "4"
    )
    sides = {k: int(sent["edit/outpaint"]["fields"][k]) for k in ("left", "right", "up", "down")}
    assert sides["up"] + sides["down"] > 150 and sides["left"] + sides["right"] == 224 - 218  # 9:16, multiples of 8
    assert sent["sd3"]["fields"]["mode"] == "image-to-image" and sent["sd3"]["fields"]["strength"] == "0.5"
    assert sent["upscale/conservative"]["fields"]["creativity"] == "0.3"
    for req, res in zip(reqs, results):
        assert res.image.shape == (req.height, req.width, 3)
        assert res.lineage.provider_model in ("edit/inpaint", "edit/outpaint", "sd3", "upscale/conservative")
    for res in results[:3]:  # the kept region is the input's, whatever the provider sent back
        assert res.measures.kept_mean_abs <= 1.0 and res.measures.kept_pixels > 100
    assert "width" in results[4].lineage.unhonoured  # the provider chose the upscale's size
    assert results[4].cost_usd == 0.25 and results[0].cost_usd == 0.03


def test_image_inputs_the_backend_cannot_take_fail_their_rows(stability_key, tmp_path):
    [img2img] = conditioned_requests([{"product": "a coin", "image": "data/packshots/coin.png", "mode": "img2img"}])
    with StabilityStub(KEY) as stub:
        [core] = StabilityBackend(fast(stub.url, model="core")).render([img2img])
        assert core.error.kind == "invalid" and "core takes no input image" in core.error.message
        assert stub.state.posts == 0  # refused before anything was sent
    changed = replace(img2img, conditioning=replace(img2img.conditioning, image_sha256="f" * 64))
    with StabilityStub(KEY) as stub:
        [result] = StabilityBackend(fast(stub.url, model="sd3")).render([changed])
        assert "bad_input: input_changed" in result.error.message and stub.state.posts == 0
