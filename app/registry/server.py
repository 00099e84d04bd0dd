"""`imagefab mlflow`: the MLflow UI and REST API over the repository's sqlite store, on loopback.

    mlflow server --backend-store-uri sqlite:///<root>/mlflow.db --default-artifact-root <root>/mlartifacts \\
                  -h 127.0.0.1 --port 5000

The store is the one jobs write to by default (`sqlite:///mlflow.db` in the working directory), so
runs, models and prompts appear without any setting. Point other machines at it with
MLFLOW_TRACKING_URI=http://HOST:5000 (bind another host with --host only on a trusted network).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def server_command(root: str | Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    root = Path(root).resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "mlartifacts"),
        "-h",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def start_server(root: str | Path, host: str = "127.0.0.1", port: int = 5000, **popen) -> subprocess.Popen:
    """Start the server in its own process group (so `stop_server` ends its workers too)."""
    (Path(root) / "mlartifacts").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(server_command(root, host, port), start_new_session=True, **popen)


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120.0) -> None:
    """Wait until `url`/health answers 200; raise TimeoutError (or RuntimeError if `proc` exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer /health within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it is still there after `timeout_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
