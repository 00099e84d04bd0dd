"""Connecting the driver to Ray: the cluster asked for, else a local one — never a dead address.

`ray start --head` records the head's address in Ray's temp folder, and a plain `ray.init()`
dials whatever is recorded there. A head that died without `ray stop` leaves its address behind,
and `ray.init()` then retries the dead GCS for minutes, deaf to SIGTERM. So before Ray is asked,
the address is probed with a short TCP connect:

- `RAY_ADDRESS` set (an address, `ray://…` or `auto`): it is used, and if nothing answers there
  the driver stops within seconds with one line naming it (a cluster was asked for; starting a
  local one instead would hide the mistake).
- otherwise the recorded address, if it answers; if it does not, one line says so and a local
  Ray starts.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


class ClusterUnreachable(Exception):
    """The Ray cluster named by RAY_ADDRESS does not answer."""


def recorded_address_file() -> Path:
    """Where `ray start` records the head's address: Ray 2.60 looks in RAY_TMPDIR, else TMPDIR
    (on Linux), else /tmp, under `ray/ray_current_cluster`."""
    root = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(root or "/tmp") / "ray" / "ray_current_cluster"


def recorded_address() -> str | None:
    try:
        text = recorded_address_file().read_text().strip()
    except OSError:
        return None
    return text or None


def host_port(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `ray://host:port` → (host, port); a clear error otherwise."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterUnreachable(f"{address!r} is not a Ray address (expected host:port or ray://host:port)")
    return host.strip("[]"), int(port)


def unreachable_reason(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at `address` (a TCP connect to its port), or None when something does."""
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as e:
        return e.strerror or str(e)
    return None


def _stderr_line(line: str) -> None:
    print(f"imagefab: {line}", file=sys.stderr, flush=True)


def connect_or_start_local(
    *, report: Callable[[str], None] = _stderr_line, probe_timeout_s: float = PROBE_TIMEOUT_S, **init_kwargs
) -> str:
    """`ray.init` on the cluster RAY_ADDRESS names, the recorded live one, or a new local Ray.

    `init_kwargs` go to `ray.init` either way (only ones valid for joining a cluster, such as
    `log_to_driver`, `logging_config`). Returns what happened: "connected", "local" or
    "already" (Ray was initialised before). Raises ClusterUnreachable when RAY_ADDRESS names a
    cluster that does not answer."""
    import ray

    if ray.is_initialized():
        return "already"
    explicit = os.environ.get("RAY_ADDRESS", "").strip()
    if explicit and explicit != "local":
        target = recorded_address() if explicit == "auto" else explicit
        if target is None:
            raise ClusterUnreachable(
                f"RAY_ADDRESS=auto, but no Ray cluster is recorded in {recorded_address_file()} (start one with `ray start --head`)"
            )
        why = unreachable_reason(target, probe_timeout_s)
        if why:
            raise ClusterUnreachable(f"RAY_ADDRESS={explicit}: no Ray cluster answers at {target} ({why})")
        ray.init(**init_kwargs)  # Ray reads RAY_ADDRESS itself
        return "connected"
    recorded = recorded_address()
    if recorded:
        try:
            why = unreachable_reason(recorded, probe_timeout_s)
        except ClusterUnreachable as e:  # a garbled file is as good as none
            why = str(e)
        if why is None:
            ray.init(address=recorded, **init_kwargs)
            return "connected"
        report(
            f"the Ray cluster recorded at {recorded} does not answer ({why}); starting a local Ray "
            f"(delete {recorded_address_file()} to forget it)"
        )
    ray.init(address="local", **init_kwargs)
    return "local"


def _not_bars_disabled(record: logging.LogRecord) -> bool:
    # Ray Data's "Progress bars disabled. To enable, set DataContext…" warning: the bars are off
    # on purpose, and --verbose is how to turn them on here.
    return not record.getMessage().startswith("Progress bars disabled")


def ray_data_logs_to_console(verbose: bool) -> str:
    """Ray Data's operator logs (dozens of INFO lines a minute) on the console only when
    `verbose`; its log file in the Ray session's logs folder keeps them either way. Returns
    that file's path. Call after Ray is initialised."""
    import ray
    import ray.data  # configures the "ray.data" logger: a file and a console handler)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":  # the handler's name in Ray Data's logging config
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            handler.removeFilter(_not_bars_disabled)
            handler.removeFilter(_no_traceback)
            if not verbose:
                handler.addFilter(_not_bars_disabled)
                handler.addFilter(_no_traceback)
    context = ray.get_runtime_context()
    return str(Path(context.get_temp_dir()) / context.get_session_name() / "logs" / "ray-data" / "ray-data.log")


def _no_traceback(record: logging.LogRecord) -> bool:
    # A stage's exception that stops the dataset (a store that stopped answering, a full disk):
    # the job says it in one line naming the location (jobs/generate.py); Ray Data's report and
    # traceback of the same error stay in its log file.
    message = record.getMessage()
    return (
        record.exc_info is None
        and "Traceback (most recent call last)" not in message
        and not message.startswith("Exception occurred in ")  # "… in user code" / "… in Ray Data or Ray Core"
    )
