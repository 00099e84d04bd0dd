"""Nobody let in: API keys, names that can never become paths, pickles never loaded, loopback binds.

The Serve app runs on loopback with a key and a model catalog holding a LoRA whose only weights
are a pickle that, if it were ever unpickled, would create a sentinel file.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow as pa
import pytest
from ports import free_port

from app.models.digest import ModelFileError
from app.serve.config import ServeConfig, load_serve_config
from app.spec import SpecError

REPO = Path(__file__).resolve().parents[1]
KEY = "security-key-0123456789abcdef"
WRONG_KEY = "wrong-key-fedcba9876543210"
TRAVERSALS = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "tiny-style/../../x",
    "..\\..\\x",
    "tiny-style%2F..%2F..",
    "~root",
]


class _Payload:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def hostile_catalog(tmp_path_factory) -> tuple[Path, Path]:
    """A user catalog with a LoRA whose only weights are a pickle, and the file that would prove it ran."""
    d = tmp_path_factory.mktemp("hostile")
    sentinel = d / "unpickled"
    lora = d / "evil-lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
    (d / "pickle.ckpt").write_bytes(pickle.dumps(_Payload(sentinel)))
    (d / "catalog.yaml").write_text(
        f"loras:\n  evil: {{source: {lora}, base: tiny-sdxl}}\n"
        f"base_models:\n  evil-base: {{source: {d / 'pickle.ckpt'}}}\n"
    )
    return d / "catalog.yaml", sentinel


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, hostile_catalog):
    from ray import serve

    from app.serve.app import build_app

    port = free_port()
    out = tmp_path_factory.mktemp("security-out") / "out"
    out.mkdir()
    (out.parent / "secret.png").write_text("SENTINEL: outside the output folder")
    config = load_serve_config(
        None,
        output_uri=str(out),
        port=port,
        steps=2,
        api_keys=[KEY],
        default_size="128x128",
        models_catalog=str(hostile_catalog[0]),
        combinations={"default": {}},
        limits={"max_side": 128, "max_pixels": 128 * 128, "max_steps": 2, "max_images": 2, "max_body_bytes": 20_000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-security", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    yield client, port, out
    client.close()
    serve.shutdown()


@pytest.fixture(scope="module")
def generated(server) -> dict:
    """One image made with the key (its id, for the file route and the catalog checks)."""
    client, _, _ = server
    r = client.post("/v1/generate", json={"prompt": "a locked door", "seed": 5, "response_format": "url"})
    assert r.status_code == 200, r.text
    return r.json()["images"][0]


# --- API keys ------------------------------------------------------------------------------------------

# A well-formed request for every route that does work: without a valid key, each is a 401.
GUARDED = [
    ("POST", "/v1/generate", {"prompt": "x"}),
    ("POST", "/v1/images/generations", {"prompt": "x"}),
    ("POST", "/sdapi/v1/txt2img", {"prompt": "x"}),
    ("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["eA=="]}),
    ("POST", "/v1/images/edits", None),
    ("GET", "/sdapi/v1/scripts", None),
    ("POST", "/sdapi/v1/png-info", {"image": "eA=="}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/files/images/0123456789abcdef0123456789abcdef.png", None),
    ("GET", "/sdapi/v1/sd-models", None),
    ("GET", "/sdapi/v1/loras", None),
    ("GET", "/sdapi/v1/samplers", None),
    ("GET", "/sdapi/v1/progress", None),
    ("GET", "/sdapi/v1/options", None),
    ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "default"}),
    ("GET", "/sdapi/v1/schedulers", None),
    ("POST", "/sdapi/v1/interrupt", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/stats", None),
    ("POST", "/v1/jobs", {"spec": {}}),
    ("GET", "/v1/jobs", None),
    ("GET", "/v1/jobs/{job_id}", None),
    ("GET", "/v1/jobs/{job_id}/images", None),
    ("POST", "/v1/jobs/{job_id}/cancel", None),
    ("POST", "/v1/jobs/{job_id}/resume", None),
    ("POST", "/v1/files", None),
    ("GET", "/v1/files/{file_id}", None),
    ("GET", "/v1/files/{file_id}/content", None),
    ("POST", "/v1/batches", {"input_file_id": "file-x"}),
    ("GET", "/v1/batches/{batch_id}", None),
    ("POST", "/v1/batches/{batch_id}/cancel", None),
]
PUBLIC = {"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# The file route also answers without a key to a signed, unexpired URL (tests/test_serve.py).


@pytest.mark.slow
@pytest.mark.ray
def test_every_route_but_health_and_docs_needs_the_key(server):
    client, port, _ = server
    served = {path for path in client.get("/openapi.json").json()["paths"]}
    guarded_paths = {path.replace("0123456789abcdef0123456789abcdef.png", "{name}") for _, path, _ in GUARDED}
    assert served - PUBLIC == guarded_paths, "a route was added: say here whether it needs a key"
    anon = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    for headers in (
        {},
        {"Authorization": f"Bearer {WRONG_KEY}"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"X-Api-Key": KEY},
    ):
        for method, path, body in GUARDED:
            r = anon.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.headers["www-authenticate"] == "Bearer"
    assert anon.get("/healthz").status_code == 200


@pytest.mark.slow
@pytest.mark.ray
def test_keys_never_reach_the_logs_or_the_catalog(server, generated, ray_local):
    """Grep this session's Ray logs and every output file (the catalog decoded: Parquet is compressed)."""
    from app.catalog.store import CatalogStore
    from app.storage import OutputStore

    client, port, out = server
    httpx.post(
        f"http://127.0.0.1:{port}/v1/generate",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {WRONG_KEY}"},
        timeout=30,
    )
    client.post("/v1/generate", json={"prompt": "a bad one", "width": 100})  # an error path, with the key
    secrets = (KEY.encode(), WRONG_KEY.encode())
    context = ray_local.get_runtime_context()
    session = Path(context.get_temp_dir()) / context.get_session_name()
    assert (session / "logs").is_dir(), session
    searched = 0
    for root in (session / "logs", out):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                searched += 1
                assert not any(s in data for s in secrets), path
    rows = CatalogStore(OutputStore.at(str(out))).read().to_pylist()
    assert generated["image_id"] in {r["image_id"] for r in rows}
    text = json.dumps(rows, default=str)
    assert KEY not in text and WRONG_KEY not in text
    assert searched > 10 and any((session / "logs").rglob("*serve*"))


# --- names that are never paths ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_names_in_requests_are_4xx_and_read_nothing(server, generated, name):
    client, _, _ = server
    requests = [
        ("/sdapi/v1/txt2img", {"prompt": f"a cat <lora:{name}:1>", "width": 128, "height": 128, "steps": 2}, "loras"),
        (
            "/sdapi/v1/txt2img",
            {
                "prompt": "a cat",
                "width": 128,
                "height": 128,
                "steps": 2,
                "override_settings": {"sd_model_checkpoint": f"{name} [0123456789]"},
            },
            "model",
        ),
        ("/v1/generate", {"prompt": "a cat", "loras": [{"name": name, "weight": 1}]}, "loras"),
        ("/v1/generate", {"prompt": "a cat", "combination": name}, "model"),
        ("/v1/images/generations", {"prompt": "a cat", "model": name}, "model"),
    ]
    for path, body, field in requests:
        r = client.post(path, json=body)
        assert r.status_code == 404 and r.json()["error"]["param"] == field, (path, body, r.text[:300])


@pytest.mark.slow
@pytest.mark.ray
def test_the_file_route_serves_only_image_ids(server, generated):
    client, _, out = server
    ok = client.get(f"/v1/files/images/{generated['image_id']}.png")
    assert ok.status_code == 200 and ok.content[:8] == b"\x89PNG\r\n\x1a\n"
    for name in [
        "../secret.png",
        "..%2Fsecret.png",
        "%2e%2e%2fsecret.png",
        "..%252Fsecret.png",
        "....//secret.png",
        f"..%2F..%2F{out.name}%2Fimages",
        "secret",
        f"{generated['image_id']}%2F..%2F..%2Fsecret",
        f"{generated['image_id'][:31]}.png",
        f"{generated['image_id'].upper()}.png",
    ]:
        r = client.get(f"/v1/files/images/{name}")
        assert r.status_code == 404, (name, r.status_code)
        assert b"SENTINEL" not in r.content
    r = client.get("/v1/files/images/%00")  # no NUL in any parameter: refused before the route runs
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text


def test_traversal_names_in_a_user_catalog_are_refused(tmp_path):
    from app.models.catalog import ModelCatalog
    from app.serve.core import resolve_serve_models

    for name in ["../../etc", "a/b", "..", "x/../../y"]:
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(json.dumps({"loras": {name: {"source": str(tmp_path), "base": "tiny-sdxl"}}}))
        with pytest.raises(ModelFileError, match="a model name is letters, digits"):
            ModelCatalog.load(catalog)
        with pytest.raises(ModelFileError, match="a model name is letters, digits"):
            resolve_serve_models(load_serve_config(None, models_catalog=str(catalog)))


@pytest.mark.parametrize("name", TRAVERSALS)
def test_traversal_names_in_a_loras_column_fail_their_rows(tiny_base, model_catalog, name):
    """The driver's path for rows (plan + expansion, as the job runs them): a failed row, no file opened."""
    from app.expand import ExpandRows
    from app.plan import resolve_models
    from app.spec import parse_spec

    spec = parse_spec({"run_name": "t", "input": {"path": "/x.csv"}, "size": "tiny-square", "steps": 2})
    models = resolve_models(spec, model_catalog, {name})
    out = ExpandRows(spec, models)(pa.table({"prompt": ["a cat", "a dog"], "loras": [f"{name}:0.5", None]}))
    assert out["status"].to_pylist() == ["failed", "pending"]
    assert out["error"][0].as_py().startswith("bad_row: unknown LoRA")


# --- only safetensors ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_a_pickle_lora_is_refused_through_the_api_and_never_unpickled(server, hostile_catalog):
    client, _, _ = server
    _, sentinel = hostile_catalog
    for path, body in [
        ("/v1/generate", {"prompt": "a cat", "loras": [{"name": "evil", "weight": 1}]}),
        ("/sdapi/v1/txt2img", {"prompt": "a cat <lora:evil:1>", "width": 128, "height": 128, "steps": 2}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == "loras", r.text
        assert "pickle-based checkpoints are refused" in r.json()["error"]["message"]
    assert "evil" not in {lo["name"] for lo in client.get("/sdapi/v1/loras").json()}
    assert not sentinel.exists()


def test_a_pickle_base_stops_the_serve_app_and_the_job_before_any_work(hostile_catalog, tmp_path):
    from app.serve.core import resolve_serve_models
    from app.spec import load_spec
    from jobs.generate import run

    catalog, sentinel = hostile_catalog
    config = load_serve_config(None, models_catalog=str(catalog), combinations={"default": {"base": "evil-base"}})
    with pytest.raises(ModelFileError, match="pickle-based checkpoints are refused"):
        resolve_serve_models(config)  # build_app's first step, before any replica starts
    (tmp_path / "rows.csv").write_text("prompt\na cat\n")
    (tmp_path / "job.yaml").write_text(
        json.dumps(
            {
                "run_name": "pickle",
                "input": {"path": "rows.csv"},
                "size": "tiny-square",
                "steps": 2,
                "model": {"base": "evil-base", "catalog": str(catalog)},
                "output": {"uri": str(tmp_path / "out")},
            }
        )
    )
    with pytest.raises(ModelFileError, match="pickle-based checkpoints are refused"):
        run(load_spec(tmp_path / "job.yaml"), quiet=True)
    assert not sentinel.exists() and not (tmp_path / "out" / "catalog").exists()


# --- where the server listens ----------------------------------------------------------------------------


def test_the_default_bind_is_loopback_and_a_public_one_needs_keys(monkeypatch):
    monkeypatch.delenv("IMAGEFAB_API_KEYS", raising=False)
    assert ServeConfig().host == "127.0.0.1"
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        ServeConfig(host=host).check_bind()
    for host in ("0.0.0.0", "::", "192.0.2.2", "example.com", "10.0.0.1"):
        with pytest.raises(SpecError, match="needs API keys"):
            ServeConfig(host=host).check_bind()
        with pytest.raises(SpecError, match="needs API keys"):
            ServeConfig().check_bind(host)  # the address Serve's own http_options bind
        ServeConfig(host=host, api_keys=(KEY,)).check_bind()


def test_the_cli_refuses_a_public_host_without_keys_before_starting_anything():
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFAB_API_KEYS"}
    res = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "host: binding to 0.0.0.0 (not loopback) needs API keys" in res.stderr
    assert "Started a local Ray instance" not in res.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_the_app_checks_the_address_serve_really_binds(server, monkeypatch):
    """`serve run` / KubeRay set Serve's http_options; the imagefab config's `host` is not what binds."""
    import app.serve.app as serve_app

    _client, port, _ = server
    assert serve_app.serve_http_host() == "127.0.0.1"  # the running proxies, read back from Serve
    public = [
        a.address
        for addrs in _interfaces().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    for address in public:  # nothing answers on this machine's other addresses
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()
    monkeypatch.delenv("IMAGEFAB_API_KEYS", raising=False)
    monkeypatch.setattr(serve_app, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(SpecError, match="binding to 0.0.0.0"):
        serve_app.build_app(ServeConfig())


def _interfaces() -> dict:
    import psutil

    return psutil.net_if_addrs()
