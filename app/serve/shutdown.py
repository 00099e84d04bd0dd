"""How `imagefab serve` stops: within `shutdown_grace_s` and `STOP_MARGIN_S`, whatever is in flight.

On Ctrl-C (SIGINT) or SIGTERM the server shuts its Serve app down:

1. Serve deletes the app's deployments, callers first: the ingress stops taking requests (the
   proxies route nothing more to it) and its requests in flight get up to `shutdown_grace_s` to
   finish; then the generators, the metrics hub and the job runner go. Every deployment is bound
   with `graceful_shutdown_timeout_s = shutdown_grace_s` (`build_app`), so Serve's controller kills
   a replica still busy then; and with `graceful_shutdown_wait_loop_s = DRAIN_POLL_S`, how often a
   draining replica looks whether its requests are done (Ray's default, 2 s, is spent at least once
   per replica and tier even when nothing is in flight).
2. The server waits for that up to `shutdown_grace_s + STOP_MARGIN_S`. If Serve has not finished by
   then (a controller that does not answer, a tier whose replicas cannot be killed), or on a second
   Ctrl-C, it kills Serve's controller and every Serve actor itself (`hard_stop`).

Asynchronous jobs are not Serve's: each runs as a Ray job beside it and goes on rendering on a
cluster while the server is down; the next server's job runner follows it from the records in the
output store. What a job catalogued is in the store before the job reports it, so a stop loses
nothing already catalogued.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("imagefab.serve")

DEFAULT_GRACE_S = 30.0
DRAIN_POLL_S = 0.5
# After the grace: Serve deletes the deployments after the ingress (their own requests ended with
# the ingress's), its controller exits, and Ray is told; seconds on a busy 2-core machine.
STOP_MARGIN_S = 15.0


def drain_options(grace_s: float) -> dict[str, Any]:
    """Serve deployment options that bound a replica's drain by the grace (a grace shorter than the
    poll: Serve's controller kills the replica at the grace all the same)."""
    return {"graceful_shutdown_timeout_s": grace_s, "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}


class StopSignals:
    """SIGINT and SIGTERM set `first`; the second of either sets `again` (stop at once). Until
    `serving()` is called a signal also raises KeyboardInterrupt, which interrupts the start.
    Installed explicitly, so a server started in the background (where a shell leaves SIGINT
    ignored) or by a process manager (SIGTERM) stops the same way as one stopped with Ctrl-C."""

    def __init__(self) -> None:
        self.first = threading.Event()
        self.again = threading.Event()
        self.name = ""
        self._serving = False
        self._previous: dict[int, Any] = {}

    def serving(self) -> None:
        self._serving = True

    def install(self) -> StopSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.first.is_set():
            self.again.set()
        else:
            self.name = signal.Signals(signum).name
            self.first.set()
            if not self._serving:
                raise KeyboardInterrupt

    def wait(self) -> str:
        while not self.first.wait(1.0):
            pass
        return self.name


@dataclass
class StopReport:
    seconds: float = 0.0
    graceful: bool = True  # Serve finished its own shutdown in time
    killed: list[str] = field(default_factory=list)  # Serve actors the hard stop killed

    def line(self) -> str:
        how = "drained" if self.graceful else f"stopped hard ({len(self.killed)} Serve actor(s) killed)"
        return f"imagefab serve: stopped in {self.seconds:.1f} s ({how})"


def stop_serving(grace_s: float, again: threading.Event | None = None, margin_s: float = STOP_MARGIN_S) -> StopReport:
    """`serve.shutdown()`, waited for up to `grace_s + margin_s` (or until `again` is set), then
    `hard_stop`. Returns what happened and how long it took."""
    from ray import serve

    start = time.monotonic()
    done = threading.Event()
    errors: list[BaseException] = []

    def shutdown() -> None:
        try:
            serve.shutdown()
        except BaseException as e:  # reported below; the hard stop still runs
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="imagefab-serve-shutdown", daemon=True).start()
    deadline = start + grace_s + margin_s
    while not done.is_set() and time.monotonic() < deadline and not (again is not None and again.is_set()):
        done.wait(0.2)
    report = StopReport()
    if not done.is_set() or errors:
        if errors:
            log.warning("serve.shutdown failed (%s): stopping Serve's actors", errors[0])
        report.graceful = False
        report.killed = hard_stop()
    report.seconds = time.monotonic() - start
    return report


def hard_stop() -> list[str]:
    """Kill Serve's controller (first, so that it restarts nothing) and then every other actor in
    Serve's namespace: proxies and replicas. Returns the names killed."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVE_NAMESPACE]
    names.sort(key=lambda n: n != SERVE_CONTROLLER_NAME)
    killed = []
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
            killed.append(name)
        except ValueError:  # gone meanwhile
            pass
    try:
        from ray.serve.context import _disconnect

        _disconnect()  # the client cached in this process points at the killed controller
    except ImportError:
        pass
    return killed
