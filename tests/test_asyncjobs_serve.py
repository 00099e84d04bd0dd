"""`imagefab serve` runs the jobs it accepts, on a cluster's head the test starts. The head declares
GPUs it does not have (Ray's resource override, as the autoscaler sets it for a node type) and the
bulk lane's resource: `imagefab serve` keeps two of three GPUs for Serve (`jobs.serve_gpus: 2`), the
head declares `gpu_bulk: 1` for the third. Every generator holds a fake GPU and renders on the CPU
(torch sees no CUDA device), through the same code paths as on a GPU node (`compute.device: auto`).

- A 200-row job posted over HTTP asks for more generators than the lane has and gets the lane's
  one; while it renders, Serve answers and an actor asking only for a GPU finds one; the job ends
  with a signed webhook and its 200 images are paged and fetched.
- A job survives a shutdown of the Serve app mid-job (Ctrl-C, which stops the server within its
  stated bound: `--shutdown-grace-s` and a margin), and a kill of the head mid-job, after which it
  is listed with its true state and resumes to completion with every image exactly once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from ports import free_port
from test_asyncjobs import Receiver, readme_verify
from test_asyncjobs_ray import SPEC, wait_for
from test_job_submit import ray_bin

from app.catalog.store import CatalogStore
from app.serve.shutdown import STOP_MARGIN_S
from app.storage import OutputStore
from benchmarks.soak import free_ports

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

GPUS, SERVE_GPUS, LANE = 3, 2, 1
# `imagefab serve --shutdown-grace-s`: Ctrl-C stops it within this plus STOP_MARGIN_S, and its
# process exits within EXIT_S more (Ray's driver disconnecting: seconds, more on a busy machine).
GRACE_S, EXIT_S = 10, 30
ROWS = 200
LANE_SPEC = {
    "run_name": "lanes",
    "model": {"base": "tiny-sdxl"},
    "size": {"width": 64, "height": 64},
    "steps": 1,
    "variations": {"seeds_per_row": 1, "base_seed": 11},
    "input": {"key_column": "sku"},
    # More generators than the lane has; device auto: a generator per (fake) GPU, as on a GPU node.
    "compute": {"generators": 4, "batch_size": 8},
}
# An actor as Serve's replicas ask: one GPU, no bulk resource. It waits until a bulk generator is
# alive, takes its GPU, and prints the GPU Ray gave it and how many bulk generators were alive then:
# the two held GPUs at the same time, whatever the speed of the machine.
SERVE_LIKE = """
import time, ray
from ray.util.state import list_actors
ray.init()
def bulk_alive():
    actors = list_actors(detail=True, limit=1000, raise_on_missing_output=False)
    return sum(a.state == "ALIVE" and "gpu_bulk" in (a.required_resources or {}) for a in actors)
deadline = time.time() + 300
while not bulk_alive():
    assert time.time() < deadline, "no bulk generator came up"
    time.sleep(0.2)
A = ray.remote(num_gpus=1, num_cpus=0)(type("ServeLike", (), {"gpu": lambda self: ray.get_gpu_ids()}))
gpu = ray.get(A.remote().gpu.remote(), timeout=120)
print("serve-like actor got GPU", gpu, "beside bulk generators:", bulk_alive())
"""
# The head: CPUs for Serve's replicas and the jobs' actors beside each other, and the fake GPUs.
RESOURCES = {"CPU": 6, "GPU": GPUS, "gpu_bulk": GPUS - SERVE_GPUS}


class Cluster:
    """A head started with `ray start --head` and `imagefab serve` against it, each in its own
    process group, so that stopping them touches no other Ray on the machine."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.out = tmp / "out"
        self.config = tmp / "serve.yaml"
        # Loopback webhook targets (the test's receiver) are allowed by the config file.
        jobs = {"allow_private_webhooks": True, "tick_s": 0.5, "serve_gpus": SERVE_GPUS}
        # The grace of the file, which `--shutdown-grace-s` overrides (see start_serve).
        self.config.write_text(yaml.safe_dump({"jobs": jobs, "shutdown_grace_s": 60}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.head: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None
        self.starts = 0
        self.temps: list[Path] = []
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(REPO),
        }

    def start_head(self) -> None:
        self.starts += 1
        gcs, dash, agent, agent_grpc, metrics, client = free_ports(6)
        temp = Path("/tmp") / f"rj{os.getpid()}-{self.starts}"  # Ray's socket paths must stay short
        self.temps.append(temp)
        log = open(self.tmp / f"head-{self.starts}.log", "w")
        self.head = subprocess.Popen(
            [
                ray_bin(),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}",
                f"--ray-client-server-port={client}",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
            ],
            env={**self.env, "RAY_OVERRIDE_RESOURCES": json.dumps(RESOURCES)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"

        def job_agent_ready():
            try:  # the job API answers once the head's job agent is up
                return httpx.get(f"{self.dashboard}/api/jobs/", timeout=2).status_code == 200
            except httpx.HTTPError:
                if self.head.poll() is not None:
                    pytest.fail(f"ray head exited: {self._log('head')}")
                return False

        wait_for(job_agent_ready, 300, f"the ray head ({self._log('head')})")

    def start_serve(self) -> None:
        log = open(self.tmp / f"serve-{self.starts}.log", "a")
        argv = ["serve", "--config", str(self.config), "--output", str(self.out), "--port", str(self.port)]
        argv += ["--shutdown-grace-s", str(GRACE_S)]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *argv],
            cwd=REPO,
            env={**self.env, "RAY_ADDRESS": self.address},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def healthy():
            if self.server.poll() is not None:
                pytest.fail(f"imagefab serve exited: {self._log('serve')}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 300, "imagefab serve")

    def stop_serve(self) -> None:
        """Ctrl-C: `imagefab serve` shuts the Serve app down (every replica, the runner's too), within
        its stated bound: the grace, Serve's margin after it, and the process's own exit (Ray's
        driver disconnecting)."""
        log = self.tmp / f"serve-{self.starts}.log"
        said = len(log.read_text()) if log.exists() else 0
        t0 = time.monotonic()
        self.server.send_signal(signal.SIGINT)
        try:
            self.server.wait(timeout=GRACE_S + STOP_MARGIN_S + EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"imagefab serve still running {time.monotonic() - t0:.0f} s after Ctrl-C: {self._log('serve')}"
            )
        text = log.read_text()[said:]
        bound = GRACE_S + STOP_MARGIN_S
        assert f"SIGINT: stopping within {bound:g} s" in text and f"those in flight get {GRACE_S:g} s" in text, text
        assert "imagefab serve: stopped in " in text and self.server.returncode == 0, text

    def kill_head(self) -> None:
        """SIGKILL the head and everything it started (raylet, GCS, workers, the jobs' drivers) and
        the server's driver: a crash, not a shutdown."""
        procs = []
        for root in (self.server, self.head):
            if root is not None and root.poll() is None:
                try:
                    parent = psutil.Process(root.pid)
                    procs += [parent, *parent.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        for root in (self.server, self.head):
            if root is not None:
                root.wait(timeout=30)

    def close(self) -> None:
        # Killed rather than stopped: `ray start --block` spends ~30 s stopping its agents on SIGTERM.
        self.kill_head()
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)

    def diagnosis(self) -> str:
        """What a failure report needs: the error lines of every head's Serve and job logs and the
        tail of `imagefab serve`'s own output (the cluster's temp folders are removed at the end)."""
        lines: list[str] = []
        for temp in self.temps:
            for log in sorted((temp / "session_latest" / "logs").glob("**/*.log")):
                if "serve" not in str(log) and "job-driver" not in log.name:
                    continue
                try:
                    text = log.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                hits = [i for i, line in enumerate(text) if "Traceback" in line or " ERROR " in line]
                for i in hits[-3:]:
                    lines.append(f"--- {log.name}:{i + 1}")
                    lines.extend(text[i : i + 25])
        return "\n".join([*lines[-300:], "--- imagefab serve:", self._log("serve")])

    @contextmanager
    def explained(self):
        """Failures inside report what the server and the cluster logged."""
        try:
            yield
        except (AssertionError, pytest.fail.Exception) as e:
            raise AssertionError(f"{e}\n{self.diagnosis()}") from e

    def _log(self, which: str) -> str:
        path = self.tmp / f"{which}-{self.starts}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    # --- HTTP --------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict:
        for _ in range(5):  # a client repeats a 503 after its Retry-After (the store busy a moment)
            r = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)
            if r.status_code != 503:
                break
            time.sleep(float(r.headers.get("retry-after", "1")))
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, job_id: str, states: set[str], timeout_s: float) -> dict:
        def reached():
            job = self.job(job_id)
            if job["state"] in states:
                return job
            if job["state"] in {"succeeded", "failed", "cancelled"}:
                pytest.fail(f"job {job_id} is {job['state']}, not {states}: {job.get('error')}")
            return None

        return wait_for(reached, timeout_s, f"job {job_id} to be {states}")

    def wait_first_image(self, job_id: str) -> dict:
        def rendering():
            job = self.job(job_id)
            return job if job["state"] != "queued" and job["progress"]["images_done"] > 0 else None

        return wait_for(rendering, 400, f"a first image of {job_id}")

    def images(self, job_id: str) -> list[dict]:
        r = httpx.get(f"{self.url}/v1/jobs/{job_id}/images?limit=500", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def catalogued(self, run_id: str) -> list[str]:
        rows = CatalogStore(OutputStore.at(str(self.out))).read(["image_id", "run_id"]).to_pylist()
        return [r["image_id"] for r in rows if r["run_id"] == run_id]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_catalog):
    c = Cluster(tmp_path_factory.mktemp("asyncjobs-serve"))
    try:
        c.start_head()
        c.start_serve()
        yield c
    finally:
        c.close()


def rows(n: int, tag: str) -> list[dict]:
    return [{"sku": f"{tag}{i}", "prompt": f"studio photo of item {i}"} for i in range(n)]


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


def test_a_200_row_job_keeps_to_the_bulk_lane_beside_serve_and_ends_signed_and_paged(cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    c = cluster
    rx = Receiver([])
    watch = ActorWatch(c.dashboard)
    try:
        with c.explained():  # a failure reports what the server and the cluster logged
            rows = [{"sku": f"L{i:03d}", "prompt": f"studio photo of item {i}"} for i in range(ROWS)]
            body = {"spec": LANE_SPEC, "rows": rows, "webhook": {"url": rx.url, "events": ["started", "succeeded"]}}
            r = httpx.post(f"{c.url}/v1/jobs", json=body, headers={"idempotency-key": "lanes-200"}, timeout=60)
            assert r.status_code == 202, r.text
            job = r.json()
            secret = job["webhook_secret"]
            assert job["progress"]["images_total"] == ROWS

            # The server counted the cluster's GPUs: the job was submitted in the lane, capped at its size.
            written = yaml.safe_load((c.out / "jobs" / job["id"] / "spec.yaml").read_text())
            assert written["compute"]["generators"] == LANE and written["compute"]["accelerator_resource"] == "gpu_bulk"

            # An actor asking for a GPU only, started now: it is placed on a GPU kept for Serve
            # while a bulk generator holds the lane's.
            ray_jobs = JobSubmissionClient(c.dashboard)
            probe = ray_jobs.submit_job(entrypoint=shlex.join([sys.executable, "-c", SERVE_LIKE]))

            c.wait_first_image(job["id"])
            # While it renders, Serve's own generator replica answers.
            gen = httpx.post(
                f"{c.url}/v1/generate",
                json={"prompt": "a red boot", "width": 64, "height": 64, "steps": 1},
                timeout=120,
            )
            assert gen.status_code == 200, gen.text
            during = c.job(job["id"])
            assert during["state"] == "running" and during["progress"]["images_done"] < ROWS, (
                "the job ended before Serve answered, which then proves nothing"
            )
            status = wait_for(
                lambda: (s := ray_jobs.get_job_status(probe)).is_terminal() and s, 300, "the Serve-like actor's job"
            )
            logs = ray_jobs.get_job_logs(probe)
            assert status == JobStatus.SUCCEEDED, logs[-3000:]
            assert "serve-like actor got GPU" in logs and "beside bulk generators: 1" in logs, logs[-3000:]

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


def test_posted_job_is_run_by_the_server_survives_a_serve_restart_and_sends_a_signed_webhook(cluster):
    with cluster.explained():
        rx = Receiver([])
        try:
            body = {
                "spec": SPEC,
                "rows": rows(4, "S"),
                "webhook": {"url": rx.url, "events": ["started", "succeeded"]},
            }
            r = httpx.post(
                f"{cluster.url}/v1/jobs", json=body, headers={"idempotency-key": "serve-restart"}, timeout=30
            )
            assert r.status_code == 202, r.text
            job = r.json()
            secret = job["webhook_secret"]

            # Nobody but the server's runner starts it.
            running = cluster.wait_first_image(job["id"])
            assert running["state"] == "running" and len(running["submissions"]) == 1

            # Within the bound (asserted there), and the Ray job is not Serve's: it goes on rendering meanwhile.
            cluster.stop_serve()
            cluster.start_serve()
            listed = httpx.get(f"{cluster.url}/v1/jobs", timeout=30).json()["data"]
            assert job["id"] in [j["id"] for j in listed]
            assert cluster.job(job["id"])["state"] in ("running", "succeeded")

            done = cluster.wait_state(job["id"], {"succeeded"}, 400)
            assert done["progress"]["images_done"] == done["progress"]["images_total"] == 8
            assert len(done["submissions"]) == 1  # followed to the end, never started again
            images = cluster.images(job["id"])
            ids = [i["image_id"] for i in images]
            assert len(ids) == len(set(ids)) == 8 and all(i["url"] for i in images)
            assert sorted(cluster.catalogued(done["run_id"])) == sorted(ids)

            # Signed deliveries, sent by the runner of the first server and of the second.
            wait_for(lambda: any(json.loads(b)["type"] == "job.succeeded" for _, b in rx.got), 60, "the webhook")
            kinds = [json.loads(body)["type"] for _, body in rx.got]
            assert kinds[0] == "job.started" and kinds[-1] == "job.succeeded", kinds
            verify = readme_verify()
            assert all(verify(secret, headers, body) for headers, body in rx.got)
            assert json.loads(rx.got[-1][1])["data"]["progress"]["images_done"] == 8

            # A finished job is not started again.
            r = httpx.post(f"{cluster.url}/v1/jobs/{job['id']}/resume", timeout=30)
            assert r.status_code == 409, r.text
        finally:
            rx.close()


def test_a_head_killed_mid_job_loses_nothing_and_resume_completes_it(cluster):
    with cluster.explained():
        body = {"spec": {**SPEC, "steps": 4}, "rows": rows(6, "H")}
        job = httpx.post(f"{cluster.url}/v1/jobs", json=body, timeout=30).json()
        running = cluster.wait_first_image(job["id"])
        assert running["progress"]["images_done"] < 12, "the job ended before the head was killed"

        cluster.kill_head()
        cluster.start_head()
        cluster.start_serve()

        # Listed, and its state is the truth: the new head has no record of its Ray job.
        assert job["id"] in [j["id"] for j in httpx.get(f"{cluster.url}/v1/jobs", timeout=30).json()["data"]]
        failed = cluster.wait_state(job["id"], {"failed"}, 120)
        assert "resume" in failed["error"]
        kept = failed["progress"]["images_done"]
        assert len(set(cluster.catalogued(job["run_id"]))) == kept

        r = httpx.post(f"{cluster.url}/v1/jobs/{job['id']}/resume", timeout=30)
        assert r.status_code == 200 and r.json()["state"] == "queued", r.text
        done = cluster.wait_state(job["id"], {"succeeded"}, 400)
        assert len(done["submissions"]) == 2
        ids = cluster.catalogued(job["run_id"])
        assert len(ids) == len(set(ids)) == 12
        assert sorted(i["image_id"] for i in cluster.images(job["id"])) == sorted(ids)
