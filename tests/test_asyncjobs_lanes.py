"""Bulk jobs and Serve sharing a cluster's GPUs, on a local head with fake GPUs: `imagefab serve`
keeps two of three GPUs for Serve (`jobs.serve_gpus: 2`), the head declares `gpu_bulk: 1` for the
third. A 200-row job posted over HTTP asks for more generators than the lane has and gets the
lane's one; while it renders, Serve answers and an actor asking only for a GPU finds one; the job
ends with a signed webhook and its 200 images are paged and fetched.

The GPUs are Ray resources only: every generator holds one, and renders on the CPU (torch sees no
CUDA device), through the same code paths as on a GPU node (`compute.device: auto`)."""

from __future__ import annotations

import json
import shlex
import struct
import sys
import threading
import time

import httpx
import pytest
import yaml
from test_asyncjobs import Receiver, readme_verify
from test_asyncjobs_ray import wait_for
from test_asyncjobs_serve import Cluster

from app.catalog.store import CatalogStore
from app.storage import OutputStore

pytestmark = [pytest.mark.slow, pytest.mark.ray]

GPUS, SERVE_GPUS, LANE = 3, 2, 1
ROWS = 200
SPEC = {
    "run_name": "lanes",
    "model": {"base": "tiny-sdxl"},
    "size": {"width": 64, "height": 64},
    "steps": 1,
    "variations": {"seeds_per_row": 1, "base_seed": 11},
    "input": {"key_column": "sku"},
    # More generators than the lane has; device auto: a generator per (fake) GPU, as on a GPU node.
    "compute": {"generators": 4, "batch_size": 8},
}
# An actor as Serve's replicas ask: one GPU, no bulk resource. It prints the GPU Ray gave it.
SERVE_LIKE = (
    "import ray; ray.init(); "
    "A = ray.remote(num_gpus=1, num_cpus=0)(type('ServeLike', (), {'gpu': lambda self: ray.get_gpu_ids()})); "
    "print('serve-like actor got GPU', ray.get(A.remote().gpu.remote(), timeout=120))"
)


class FakeGpuCluster(Cluster):
    """The async jobs' test cluster, its head declaring GPUs it does not have (Ray's resource
    override, as the autoscaler sets it for a node type) and the bulk lane's resource."""

    def start_head(self) -> None:
        env = self.env
        resources = {"CPU": 6, "GPU": GPUS, "gpu_bulk": GPUS - SERVE_GPUS}
        self.env = {**env, "RAY_OVERRIDE_RESOURCES": json.dumps(resources)}
        try:
            super().start_head()
        finally:
            self.env = env


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory, model_catalog):
    c = FakeGpuCluster(tmp_path_factory.mktemp("asyncjobs-lanes"))
    jobs = {"allow_private_webhooks": True, "tick_s": 0.5, "serve_gpus": SERVE_GPUS}
    c.config.write_text(yaml.safe_dump({"jobs": jobs}))
    try:
        c.start_head()
        c.start_serve()
        yield c
    finally:
        c.close()


class ActorWatch:
    """Samples the cluster's actors (Ray's state API on the dashboard) every second: the most actors
    asking for the bulk resource at once (alive, or still being created), and Serve's generator
    replicas."""

    def __init__(self, dashboard: str):
        self.dashboard = dashboard
        self.most_bulk = 0  # alive
        self.most_bulk_asked = 0  # alive, starting, or waiting to be placed
        self.serve_generators: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from ray.util.state import list_actors

        while not self.stop.is_set():
            try:
                actors = list_actors(address=self.dashboard, detail=True, limit=1000, raise_on_missing_output=False)
            except Exception:  # the dashboard busy a moment: the next sample
                actors = []
            bulk = [a for a in actors if "gpu_bulk" in (a.required_resources or {})]
            self.most_bulk = max(self.most_bulk, sum(a.state == "ALIVE" for a in bulk))
            self.most_bulk_asked = max(self.most_bulk_asked, sum(a.state != "DEAD" for a in bulk))
            serve = [a for a in actors if ":generator-" in a.class_name and a.state == "ALIVE"]
            if serve:
                self.serve_generators = [a.required_resources or {} for a in serve]
            self.stop.wait(1.0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    return struct.unpack(">II", data[16:24])


def test_a_200_row_job_keeps_to_the_bulk_lane_beside_serve_and_ends_signed_and_paged(gpu_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    c = gpu_cluster
    rx = Receiver([])
    watch = ActorWatch(c.dashboard)
    try:
        with c.explained():  # a failure reports what the server and the cluster logged
            rows = [{"sku": f"L{i:03d}", "prompt": f"studio photo of item {i}"} for i in range(ROWS)]
            body = {"spec": SPEC, "rows": rows, "webhook": {"url": rx.url, "events": ["started", "succeeded"]}}
            r = httpx.post(f"{c.url}/v1/jobs", json=body, headers={"idempotency-key": "lanes-200"}, timeout=60)
            assert r.status_code == 202, r.text
            job = r.json()
            secret = job["webhook_secret"]
            assert job["progress"]["images_total"] == ROWS

            # The server counted the cluster's GPUs: the job was submitted in the lane, capped at its size.
            written = yaml.safe_load((c.out / "jobs" / job["id"] / "spec.yaml").read_text())
            assert written["compute"]["generators"] == LANE and written["compute"]["accelerator_resource"] == "gpu_bulk"

            c.wait_first_image(job["id"])
            # While it renders: an actor asking for a GPU only is placed on a GPU kept for Serve ...
            ray_jobs = JobSubmissionClient(c.dashboard)
            probe = ray_jobs.submit_job(entrypoint=shlex.join([sys.executable, "-c", SERVE_LIKE]))
            status = wait_for(
                lambda: (s := ray_jobs.get_job_status(probe)).is_terminal() and s, 180, "the Serve-like actor's job"
            )
            assert status == JobStatus.SUCCEEDED, ray_jobs.get_job_logs(probe)[-3000:]
            assert "serve-like actor got GPU" in ray_jobs.get_job_logs(probe)
            # ... and Serve's own generator replica answers.
            t0 = time.time()
            gen = httpx.post(
                f"{c.url}/v1/generate",
                json={"prompt": "a red boot", "width": 64, "height": 64, "steps": 1},
                timeout=120,
            )
            assert gen.status_code == 200, gen.text
            during = c.job(job["id"])
            assert during["state"] == "running" and during["progress"]["images_done"] < ROWS, (
                "the job ended before the Serve-side checks, which then prove nothing; "
                f"they took {time.time() - t0:.0f} s after the probe"
            )

            done = c.wait_state(job["id"], {"succeeded"}, 600)
            watch.close()
            assert done["progress"]["images_done"] == ROWS and done["progress"]["counts"]["failed"] == 0
            # Never more bulk generators than the lane, none asked for beyond it; Serve's replica on a GPU of its own.
            assert watch.most_bulk == watch.most_bulk_asked == LANE
            assert watch.serve_generators and all(
                res.get("GPU") == 1 and "gpu_bulk" not in res for res in watch.serve_generators
            )
            # Each generator held a fake GPU and rendered on the CPU.
            cat = CatalogStore(OutputStore.at(str(c.out))).read(["run_id", "accelerator"]).to_pylist()
            devices = {r["accelerator"].split(":", 1)[0] for r in cat if r["run_id"] == done["run_id"]}
            assert devices == {"cpu"}

            # The webhook: signed as the README's snippet checks.
            wait_for(lambda: any(json.loads(b)["type"] == "job.succeeded" for _, b in rx.got), 60, "the webhook")
            verify = readme_verify()
            # At least once: a resend keeps its webhook-id, by which a receiver deduplicates.
            events = {h["webhook-id"]: json.loads(b)["type"] for h, b in rx.got}
            assert list(events.values()) == ["job.started", "job.succeeded"]
            assert all(verify(secret, headers, b) for headers, b in rx.got)
            assert not verify(secret, rx.got[-1][0], rx.got[-1][1] + b" ")
            assert json.loads(rx.got[-1][1])["data"]["progress"]["images_done"] == ROWS

            # Its images, paged; every URL is signed and serves the image without a key.
            seen, pages, offset = [], [], 0
            while True:
                page = httpx.get(
                    f"{c.url}/v1/jobs/{job['id']}/images", params={"limit": 64, "offset": offset}, timeout=60
                )
                assert page.status_code == 200, page.text
                p = page.json()
                assert p["total"] == ROWS
                pages.append((len(p["data"]), p["has_more"]))
                seen += p["data"]
                offset += len(p["data"])
                if not p["has_more"]:
                    break
            assert pages == [(64, True), (64, True), (64, True), (8, False)]
            assert len({i["image_id"] for i in seen}) == ROWS
            assert sorted(i["row_key"] for i in seen) == sorted(r["sku"] for r in rows)
            with httpx.Client(base_url=c.url, timeout=60) as http:
                for image in seen:
                    assert "sig=" in image["url"] and image["status"] != "failed", image
                    got = http.get(image["url"])
                    assert got.status_code == 200 and got.headers["content-type"] == "image/png", (
                        image,
                        got.text[:200],
                    )
                    assert png_size(got.content) == (64, 64)
    finally:
        watch.close()
        rx.close()
