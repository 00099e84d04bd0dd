"""`imagefab serve` runs the jobs it accepts, on a cluster's head the test starts: a job posted
over HTTP is started by the server's job runner and finishes with its images paged and a signed
webhook; it survives a shutdown of the Serve app mid-job, and a kill of the head mid-job, after
which it is listed with its true state and resumes to completion with every image exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
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
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def distinct_ports(n: int) -> list[int]:
    """`n` free loopback ports, all different: held open together while they are chosen (Ray
    refuses a head whose components were given the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    """A head started with `ray start --head` and `imagefab serve` against it, each in its own
    process group, so that stopping them touches no other Ray on the machine."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.out = tmp / "out"
        self.config = tmp / "serve.yaml"
        # Loopback webhook targets (the test's receiver) are allowed by the config file.
        self.config.write_text(yaml.safe_dump({"jobs": {"allow_private_webhooks": True, "tick_s": 0.5}}))
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
        gcs, dash, agent, agent_grpc, metrics, client = distinct_ports(6)
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
                "--num-cpus=4",  # logical: Serve's replicas and the job's actors fit beside each other
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
            env=self.env,
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
        """Ctrl-C: `imagefab serve` shuts the Serve app down (every replica, the runner's too)."""
        self.server.send_signal(signal.SIGINT)
        self.server.wait(timeout=120)

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

            cluster.stop_serve()  # the Ray job is not Serve's: it goes on rendering meanwhile
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
