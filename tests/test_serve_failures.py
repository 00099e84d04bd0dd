"""The Serve app when its parts fail under it, over real HTTP on a local Ray with the tiny models.

- A generator replica's process is killed (SIGKILL) while clients keep sending requests: every
  request ends within its timeout, as a 200 or a 503/504 (never a 500), Serve starts a replacement
  and requests succeed again, and every image a 200 returned has its catalog row.
- The output store's disk fills: requests get a 507 naming the store, both below the configured
  reserve (`limits.min_free_bytes`, refused before any work) and when a write itself finds no space
  (ENOSPC: an upload, the images, the server's own files; the job routes answer 503 naming the
  store), nothing half-written is left where a reader looks,
  and requests succeed again once space returns. The disk is a real 32 MiB filesystem (tmpfs)
  mounted for the test, which needs the right to mount (root, as in CI); without it that test skips.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ports import free_port

from app.serve.config import load_serve_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
KEY = "failures-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_TIMEOUT_S = 30.0
RESERVE = 256 << 10  # limits.min_free_bytes of the test server
DISK = "32m"


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A real 32 MiB filesystem mounted at a fresh folder, or None where this process may not mount."""
    where = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0755", "imagefab-test-disk", str(where)],
        capture_output=True,
        text=True,
    )
    yield where if mounted.returncode == 0 else None
    if mounted.returncode == 0:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


@pytest.fixture(scope="module")
def server(ray_local, small_disk, tmp_path_factory):
    """The app with one generator replica, its output store on the small disk when there is one."""
    from ray import serve

    from app.serve.app import build_app

    port = free_port()
    out = (small_disk or tmp_path_factory.mktemp("failures")) / "out"
    config = load_serve_config(
        None,
        output_uri=str(out),
        port=port,
        steps=2,
        default_size="128x128",
        api_keys=[KEY],
        batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        limits={"max_in_flight": 16, "request_timeout_s": REQUEST_TIMEOUT_S, "min_free_bytes": RESERVE},
        jobs={"runner": False},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-failures", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S + 30, headers=AUTH)
    yield client, out
    client.close()
    serve.shutdown()


def catalog_ids(out: Path) -> list[str]:
    from app.catalog.store import CatalogStore
    from app.storage import OutputStore

    return CatalogStore(OutputStore.at(str(out))).read(["image_id"]).column("image_id").to_pylist()


def generator_pid(client: httpx.Client) -> int | None:
    """The generator replica's process id, or None while none answers."""
    r = client.get("/v1/stats")
    return r.json()["generators"]["tiny-sdxl"]["pid"] if r.status_code == 200 else None


def test_generator_replica_killed_under_load(server):
    client, out = server
    before = generator_pid(client)
    assert before is not None
    answers: list[tuple[float, float, int | None, dict | str]] = []  # (sent at, seconds, status, body)
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=REQUEST_TIMEOUT_S + 15, headers=AUTH) as c:
            k = 0
            while not stop.is_set():
                sent = time.monotonic()
                body = {"prompt": f"a kite {worker}-{k}", "seed": k, "n": 1 + k % 2}
                try:
                    r = c.post("/v1/generate", json=body)
                    answers.append((sent, time.monotonic() - sent, r.status_code, _body(r)))
                    if r.status_code != 200:  # as a client that honours Retry-After, but sooner
                        time.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))
                except httpx.TimeoutException as e:
                    answers.append((sent, time.monotonic() - sent, None, repr(e)))
                k += 1

    def ok_since(t: float) -> int:
        return sum(1 for sent, _, status, _ in list(answers) if status == 200 and sent > t)

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: ok_since(0) >= 4, 60, "requests before the kill")
        os.kill(before, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: generator_pid(client) not in (None, before), 90, "a replacement replica")
        replaced = time.monotonic()
        _wait(lambda: ok_since(replaced) >= 4, 60, "requests served by the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 20)

    statuses = [status for _, _, status, _ in answers]
    # 1. Every request ended within its timeout (none hung), as a 200 or a 503/504: never a 500.
    assert None not in statuses, [a for a in answers if a[2] is None]
    assert max(seconds for _, seconds, _, _ in answers) < REQUEST_TIMEOUT_S + 10
    assert set(statuses) <= {200, 503, 504}, [a for a in answers if a[2] not in (200, 503, 504)]
    for _, _, status, body in answers:
        if status == 503:
            assert "generator is unavailable" in body["error"]["message"], body
    # 2. The requests in flight at the kill ended too; the replacement serves the later ones.
    assert any(sent < killed < sent + seconds for sent, seconds, _, _ in answers)
    assert ok_since(replaced) >= 4
    # 3. Every image a 200 returned is catalogued, once.
    served = [im["image_id"] for _, _, status, body in answers if status == 200 for im in body["images"]]
    catalogued = catalog_ids(out)
    assert set(served) <= set(catalogued) and len(catalogued) == len(set(catalogued))


def test_full_disk_answers_507_and_recovers(server, small_disk):
    if small_disk is None:
        pytest.skip("mounting a small filesystem needs the right to mount (root with CAP_SYS_ADMIN)")
    client, out = server
    filler = small_disk / "filler"
    rows = len(catalog_ids(out))

    def fill_to(free: int) -> None:
        """Grow or shrink the filler file until the disk has about `free` bytes left."""
        filler.touch()
        size = filler.stat().st_size + shutil.disk_usage(small_disk).free - free
        with open(filler, "r+b") as f:
            f.truncate(max(size, 0))
            if size > 0:
                os.posix_fallocate(f.fileno(), 0, size)

    try:
        # 1. Below the reserve: refused before any work, in each dialect's error shape.
        fill_to(RESERVE // 2)
        r = client.post("/v1/generate", json={"prompt": "a cup", "seed": 1})
        assert r.status_code == 507 and r.headers["retry-after"], r.text
        message = r.json()["error"]["message"]
        assert str(out) in message and "limits.min_free_bytes" in message and "no space left" in message
        r = client.post("/v1/images/generations", json={"prompt": "a cup", "size": "128x128"})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cup", "width": 128, "height": 128})
        assert r.status_code == 507, r.text

        # 2. Above the reserve, but a write finds the disk full (ENOSPC): an upload larger than what is left
        fill_to(RESERVE + (64 << 10))
        noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, "PNG", compress_level=0)  # ~3 MiB
        image = base64.b64encode(buf.getvalue()).decode()
        body = {"prompt": "a cup", "seed": 1, "mode": "img2img", "image": image, "width": 128, "height": 128}
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 507 and "No space left on device" in r.json()["error"]["message"], r.text
        assert not (out / "inputs").exists() or not list((out / "inputs").iterdir())

        # ... the images of a request (masters larger than what is left)
        fill_to(RESERVE + (64 << 10))
        wide = {"prompt": "a wide cup", "seed": 3, "n": 2, "width": 512, "height": 512}
        r = client.post("/v1/generate", json=wide)
        assert r.status_code == 507 and "No space left on device" in r.json()["error"]["message"], r.text

        # ... the server's own files and the job API's (an OpenAI batch input file)
        fill_to(0)
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "default"})
        assert r.status_code == 507, r.text
        line = {"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}
        files = {"file": ("in.jsonl", json.dumps(line).encode() + b"\n")}
        r = client.post("/v1/files", data={"purpose": "batch"}, files=files)
        assert r.status_code == 507 and r.headers["retry-after"], r.text
        assert str(out) in r.json()["error"]["message"] and "No space left on device" in r.text
        assert len(catalog_ids(out)) == rows  # nothing catalogued while the disk was full
    finally:
        filler.unlink(missing_ok=True)

    # 3. Nothing half-written where a reader looks: no temporary file left, every file whole.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for path in out.rglob("*.parquet"):
        pq.read_table(path)
    for path in [*out.glob("images/**/*.png"), *out.glob("inputs/*")]:
        with Image.open(path) as im:
            im.load()

    # 4. Space is back: the same requests succeed, catalogued.
    for body in ({"prompt": "a cup", "seed": 1}, wide):
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert {im["image_id"] for im in r.json()["images"]} <= set(catalog_ids(out))
    r = client.post("/v1/generate", json={**body, "image": image, "mode": "img2img", "width": 128, "height": 128})
    assert r.status_code == 200, r.text


def _body(r: httpx.Response) -> dict | str:
    try:
        return r.json()
    except ValueError:
        return r.text


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.5)
