"""`ray job submit` against a local head started by the test, as a user would on a cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

from app.catalog.store import CatalogStore
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head(tmp_path):
    """A head node in its own process group (so stopping it leaves any other local Ray alone)."""
    gcs, dash, agent, agent_grpc, metrics = (free_port() for _ in range(5))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path("/tmp") / f"rs{os.getpid()}"  # Ray's socket paths must stay short
    proc = subprocess.Popen(
        [
            ray_bin(),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # The session's own local Ray (other tests) holds the default agent ports: a second
            # head on the same ports never gets a job agent ("No available agent to submit job").
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 300  # a loaded machine can take minutes to start the job agent
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray head exited: {(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    else:
        pytest.fail(f"ray head did not answer: {(tmp_path / 'head.log').read_text()[-3000:]}")
    yield address, env
    # `ray start --block` spends ~30 s stopping its dashboard and agents on SIGTERM (measured);
    # the job is over by now, so after a short grace the group is killed and its folder removed.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_bulk_job(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    cmd = [
        ray_bin(),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "-m",
        "jobs.generate",
        "specs/ecommerce.yaml",
        "--output",
        str(out),
        "--limit",
        "2",
        "--set",
        "postprocess.presets=[thumbnail]",
        "--quiet",
        "--no-mlflow",
    ]
    env = {**env, "IMAGEFAB_HOME": os.environ["IMAGEFAB_HOME"]}
    deadline = time.time() + 300  # a loaded machine can take minutes to start the job agent
    while True:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        # The dashboard answers before the head's job agent has registered; that is worth a retry.
        if "No available agent" not in res.stdout + res.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in res.stdout
    assert "accepted" in res.stdout and "run ecommerce-studio-" in res.stdout
    rows = CatalogStore(OutputStore.at(str(out))).read().to_pylist()
    assert len(rows) == 4 and all(r["status"] != "failed" for r in rows)
