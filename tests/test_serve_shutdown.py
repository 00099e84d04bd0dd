"""The bound on `imagefab serve`'s shutdown, without a cluster: the grace's setting (config, flag,
default), every deployment's drain bounded by it, and the stop signals. The whole stop on a cluster
with a job rendering is timed in tests/test_asyncjobs_serve.py (the Serve restart test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.serve.deployment import Application

from app.cli import build_parser
from app.serve.app import build_app
from app.serve.config import load_serve_config
from app.serve.shutdown import DEFAULT_GRACE_S, DRAIN_POLL_S, StopSignals
from app.spec import SpecError

REPO = Path(__file__).resolve().parents[1]


def test_the_grace_defaults_to_30_s_and_the_flag_overrides_the_config(tmp_path):
    assert load_serve_config(None).shutdown_grace_s == DEFAULT_GRACE_S == 30.0
    path = tmp_path / "serve.yaml"
    path.write_text("shutdown_grace_s: 20\n")
    assert load_serve_config(path).shutdown_grace_s == 20.0
    args = build_parser().parse_args(["serve", "--config", str(path), "--shutdown-grace-s", "5"])
    assert load_serve_config(args.config, shutdown_grace_s=args.shutdown_grace_s).shutdown_grace_s == 5.0
    args = build_parser().parse_args(["serve", "--config", str(path)])
    assert load_serve_config(args.config, shutdown_grace_s=args.shutdown_grace_s).shutdown_grace_s == 20.0
    with pytest.raises(SpecError, match="shutdown_grace_s"):
        load_serve_config(None, shutdown_grace_s=-1)


def deployments(app: Application) -> dict[str, object]:
    """Every deployment bound into the app: the ingress and those passed to it."""
    found = {}

    def visit(value):
        if isinstance(value, Application):
            d = value._bound_deployment
            found[d.name] = d._deployment_config
            for arg in d.init_args:
                visit(arg)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    visit(app)
    return found


def test_every_deployment_drains_within_the_grace(tmp_path, model_catalog):
    app = build_app(load_serve_config(None, output_uri=str(tmp_path / "out"), shutdown_grace_s=7))
    configs = deployments(app)
    assert set(configs) == {"Ingress", "generator-tiny-sdxl", "metrics", "job-runner"}
    for name, config in configs.items():
        assert config.graceful_shutdown_timeout_s == 7, name
        assert config.graceful_shutdown_wait_loop_s == DRAIN_POLL_S, name


def test_sigterm_and_sigint_stop_the_server_and_a_second_one_stops_it_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signals = StopSignals().install()
    try:
        signals.serving()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait() == "SIGTERM" and not signals.again.is_set()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the second says "at once"
        assert signals.again.wait(5)
    finally:
        signals.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_while_serve_starts_interrupts_the_start():
    signals = StopSignals().install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the start, interrupted
        assert signals.name == "SIGTERM" and signals.first.is_set()
    finally:
        signals.restore()


@pytest.mark.ray
def test_a_replica_that_outlasts_the_grace_is_stopped_hard_within_the_bound(ray_local):
    """A request still running when the grace and the margin are over (its deployment would let it
    drain for a minute): the server kills Serve's controller and replicas itself, and returns."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_NAMESPACE

    from app.serve.shutdown import stop_serving

    @serve.deployment(graceful_shutdown_timeout_s=60, graceful_shutdown_wait_loop_s=0.5)
    class Slow:
        async def __call__(self) -> str:
            import asyncio

            await asyncio.sleep(120)
            return "done"

    serve.start(proxy_location="Disabled")  # called through its handle: no HTTP proxy to start
    handle = serve.run(Slow.bind(), name="slow", route_prefix=None)
    response = handle.remote()
    time.sleep(1)  # the request reaches the running replica (were it not there, the drain would be quick: a failure)
    report = stop_serving(grace_s=1, margin_s=2)
    assert not report.graceful and report.seconds < 1 + 2 + 10, report
    assert any(name.startswith("SERVE_REPLICA::slow#Slow") for name in report.killed), report.killed
    assert "SERVE_CONTROLLER_ACTOR" in report.killed
    left = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVE_NAMESPACE]
    assert left == [], left
    with pytest.raises(Exception):  # the request in flight ends with an error, not after its two minutes
        response.result(timeout_s=30)


def test_a_server_started_with_sigint_ignored_still_stops_on_it():
    """A shell starts its background jobs with SIGINT ignored, and Python then installs no handler
    of its own: the server's handler takes the signal all the same."""
    code = (
        "from app.serve.shutdown import StopSignals\n"
        "s = StopSignals().install(); s.serving(); print('ready', flush=True); print(s.wait(), flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.strip() == "SIGINT" and proc.returncode == 0
