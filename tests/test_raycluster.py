"""A dead recorded Ray address: `imagefab run` notices it in seconds and starts a local Ray;
an unreachable RAY_ADDRESS stops it with one line instead.

The real case: a head started with `ray start --head` and SIGKILLed (its address stays recorded
in Ray's temp folder). Each test keeps its Ray temp folder private (`RAY_TMPDIR`), so no other
test, and no other Ray on the machine, sees the dead address."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ports import free_port

from app.catalog.store import CatalogStore
from app.raycluster import ClusterUnreachable, host_port, recorded_address, recorded_address_file, unreachable_reason
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A private Ray temp root; short, because Ray's socket paths must stay under ~107 bytes."""
    root = Path(f"/tmp/rc{os.getpid()}-{free_port()}")
    root.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield root
    shutil.rmtree(root, ignore_errors=True)


# --- the probe, without Ray ---------------------------------------------------------------------


def test_recorded_address_is_read_from_rays_temp_folder(ray_tmpdir):
    assert recorded_address_file() == ray_tmpdir / "ray" / "ray_current_cluster"
    assert recorded_address() is None
    recorded_address_file().parent.mkdir()
    recorded_address_file().write_text("127.0.0.1:6379\n")
    assert recorded_address() == "127.0.0.1:6379"


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("ray://10.0.0.5:10001", ("10.0.0.5", 10001)),
        ("[::1]:6379", ("::1", 6379)),
    ],
)
def test_host_port(address, expected):
    assert host_port(address) == expected


@pytest.mark.parametrize("address", ["head-node", "127.0.0.1:", "http://head:port"])
def test_host_port_names_a_bad_address(address):
    with pytest.raises(ClusterUnreachable, match="not a Ray address"):
        host_port(address)


def test_probe_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert unreachable_reason(f"127.0.0.1:{port}") is None
    t0 = time.monotonic()
    why = unreachable_reason(f"127.0.0.1:{port}")  # closed now
    assert why and "refused" in why.lower() and time.monotonic() - t0 < 1


# --- the command, with a real dead head ----------------------------------------------------------


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def start_head(root: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --head` recording its address under `root`. Ray gives a raylet 30 s to register
    with its GCS, which a busy machine can miss: then the head is started again, at most thrice."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    for _ in range(3):
        port = free_port()
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                # Free ports for the agent and metrics: another local Ray may hold the defaults.
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--temp-dir={root / 'ray'}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while recorded_address() is None and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if recorded_address() is not None:
            return head, port
        kill_group(head.pid)
        head.wait(timeout=30)
    pytest.fail(f"ray start did not come up: {log.read_text()[-3000:]}")


def dead_head(root: Path, log: Path) -> str:
    """Start a head, then SIGKILL its whole process group: its address stays recorded."""
    head, port = start_head(root, log)
    try:
        # Ray records the node's own address, never loopback; the same port on loopback is the same
        # GCS (it listens on every interface), and keeps this test's probes on the loopback interface.
        recorded = recorded_address()
        assert recorded and recorded.endswith(f":{port}"), recorded
        address = f"127.0.0.1:{port}"
        assert unreachable_reason(address) is None  # alive
        kill_group(head.pid)  # no `ray stop`: the address stays recorded
        head.wait(timeout=30)
        deadline = time.monotonic() + 30
        while unreachable_reason(address) is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the GCS goes with its group
        assert unreachable_reason(address), "the head's GCS still answers after SIGKILL"
        assert recorded_address() == recorded
    finally:
        kill_group(head.pid)  # whatever failed above, no head outlives the test
    recorded_address_file().write_text(address)
    return address


def run_cli(args: list[str], timeout: float) -> tuple[int, str, list[tuple[float, str]]]:
    """`imagefab ARGS`: exit code, stdout, and stderr's lines stamped with the seconds since launch."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    stdout: list[str] = []

    def read_stderr():
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic() - t0, line.rstrip()))

    def read_stdout():
        assert proc.stdout is not None
        stdout.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stderr, read_stdout)]
    for r in readers:
        r.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("imagefab did not finish:\n" + "\n".join(f"{t:6.1f} {s}" for t, s in lines[-60:]))
    for r in readers:
        r.join(10)
    return rc, "".join(stdout), lines


def first(lines, needle: str) -> float | None:
    return next((t for t, s in lines if needle in s), None)


@pytest.mark.slow
@pytest.mark.ray
def test_run_with_a_dead_recorded_address_starts_a_local_ray(ray_tmpdir, tmp_path):
    address = dead_head(ray_tmpdir, tmp_path / "head.log")
    # The control: the same command's start-up (imports, spec, input and model checks) up to the
    # point where it would connect, as `imagefab validate` does it — on a busy machine that alone
    # takes tens of seconds, which is not the dead address's doing.
    t0 = time.monotonic()
    assert run_cli(["validate", "specs/ecommerce.yaml"], timeout=300)[0] == 0
    start_up = time.monotonic() - t0
    out = tmp_path / "out"
    rc, stdout, lines = run_cli(
        [
            "run",
            "specs/ecommerce.yaml",
            "--set",
            "steps=2",
            "--set",
            "variations.seeds_per_row=1",
            "--limit",
            "1",
            "--no-mlflow",
            "--output",
            str(out),
            "--json",
        ],
        timeout=600,  # minutes only on a machine loaded many times over; idle, it is under one
    )
    text = "\n".join(f"{t:6.1f} {s}" for t, s in lines) + "\nstdout:\n" + stdout
    assert rc == 0, text
    said = [s for _, s in lines if address in s]
    assert len(said) == 1 and "does not answer" in said[0] and "starting a local Ray" in said[0], text
    # Noticed within seconds of the start-up's end (the probe is one refused connect), then the
    # local Ray starts as it always does (seconds on an idle machine, longer on a busy one).
    noticed, started = first(lines, "does not answer"), first(lines, "Started a local Ray instance")
    assert noticed is not None and noticed < start_up + 15, f"start-up alone {start_up:.1f} s\n{text}"
    assert started is not None and started - noticed < 120, text
    assert "GCS" not in text and "Failed to connect" not in text, text
    assert len(CatalogStore(OutputStore.at(str(out))).read().to_pylist()) == 1
    # --json: the summary is all of stdout; progress and notes went to stderr.
    summary = json.loads(stdout)
    assert summary["rendered"] == 1 and summary["output"] == str(out)
    assert sum(summary["counts"].values()) == 1
    progress = [s for _, s in lines if s.startswith("progress ")]
    assert progress and progress[-1].startswith("progress 1/1 images (100%)") and "cost $" in progress[-1], text
    # Ray Data's operator logs went to the file named in one line, not to the console.
    [note] = [s for _, s in lines if s.startswith("Ray Data's operator logs: ")]
    log_file = Path(note.removeprefix("Ray Data's operator logs: ").split(" (")[0])
    assert log_file.is_relative_to(ray_tmpdir) and "Starting execution of Dataset" in log_file.read_text()
    assert "Starting execution of Dataset" not in text and "Progress bars disabled" not in text, text


@pytest.mark.slow
def test_unreachable_ray_address_fails_fast_with_one_line(ray_tmpdir, tmp_path, monkeypatch):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", address)
    rc, stdout, lines = run_cli(
        ["run", "specs/ecommerce.yaml", "--limit", "1", "--no-mlflow", "--output", str(tmp_path / "out")],
        timeout=120,
    )
    text = "\n".join(s for _, s in lines) + stdout
    assert rc == 2, text
    errors = [s for _, s in lines if s.startswith("imagefab: error:")]
    assert errors == [
        f"imagefab: error: RAY_ADDRESS={address}: no Ray cluster answers at {address} (Connection refused)"
    ], text
    assert "Started a local Ray" not in text and not (tmp_path / "out" / "catalog").exists()
