"""Long hours on the tiny models: does memory stay flat and latency steady under steady load?

    python -m benchmarks.soak --minutes 30 [--load 0.8] [--ramp 1 2 4 8] [--ramp-seconds 20] [--trace]
    python -m benchmarks.soak --bulk-images 4000

Serve (the default):
  1. a local cluster (`ray start --head` on free loopback ports, its own temp folder) and
     `imagefab serve` against it, with the tiny model (one generator replica, 2 steps, 128x128);
  2. capacity: closed-loop clients at each `--ramp` concurrency for `--ramp-seconds` give the peak
     (the best throughput of 200s); then open-loop probes, requests evenly spaced as in the hold,
     at 100 %, 90 %, … 50 % of that peak for `--probe-seconds` each: the first rate answered with
     no error and p99 within `--probe-bound` x one request's latency alone is the capacity (spaced
     requests are batched in ones and twos, so they get less than closed-loop clients do);
  3. the hold: requests sent open-loop, evenly spaced, at `--load` x capacity for `--minutes`.
     Latency is counted from the moment a request was due, so a server that falls behind shows
     it (no coordinated omission);
  4. every minute: requests, 200s, errors (anything else: a 503, a 5xx, a timeout), p50 / p99
     latency, the machine's load average, and the RSS of every Ray actor (each Serve replica, the
     proxy, the controller), of the `imagefab serve` driver and of the head's own processes
     (GCS, raylet, dashboard), by pid, through psutil; per process, the RSS series over the hold
     and its least-squares slope over the last half (KB/min), so that "flat" is a number.
Bulk (`--bulk-images N`): one bulk run of N images with the stand-in generator
(benchmarks/standin.py), the driver's RSS sampled every second against the images catalogued so
far: a driver whose memory grows with the images done keeps per-image state.

Writes JSON to benchmarks/runs/ (or `--out`) and prints a short Markdown summary. Exit 1 when a
request failed in the hold, or when an RSS grew by more than `--max-growth-mb` from the start of
the hold (bulk: from 10 % of the images) to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from benchmarks.load import KEY, run_level

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_ports(n: int) -> list[int]:
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


def rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def process_name(cmdline: list[str]) -> str:
    """`gcs_server`, `raylet`, `dashboard.py`, `ray-dashboard-StateHead-0`, `ray.util.client.server`:
    the program, or the script or module a Python process runs."""
    if not cmdline:
        return "?"
    prog = Path(cmdline[0].split(" ", 1)[0]).name
    if not prog.startswith("python"):
        return prog
    args = iter(cmdline[1:])
    for arg in args:
        if arg == "-m":
            return next(args, "?")
        if arg == "-c":
            return f"{prog} -c"
        if not arg.startswith("-"):
            return Path(arg).name
    return prog


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


# --- the server under test ---------------------------------------------------------------------------


class LocalServe:
    """`ray start --head` and `imagefab serve` against it, each in a process group of its own, so
    that stopping them touches no other Ray on the machine."""

    def __init__(self, tmp: Path, steps: int, size: str, max_in_flight: int):
        self.tmp = tmp
        self.env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
        gcs, dash, agent, agent_grpc, metrics, client, http = free_ports(7)
        self.gcs, self.http = gcs, http
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.url = f"http://127.0.0.1:{http}"
        self.temp = Path("/tmp") / f"rsoak{os.getpid()}"  # Ray's socket paths must stay short
        width, _, height = size.partition("x")
        config = {
            "steps": steps,
            "default_size": size,
            "api_keys": [KEY],
            "combinations": {"plain": {}},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            "limits": {
                "max_in_flight": max_in_flight,
                "max_side": max(int(width), int(height)),
                "max_pixels": int(width) * int(height),
                "request_timeout_s": 120,
            },
            "jobs": {"runner": False},
        }
        (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
        self.head_argv = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--num-cpus=2",
            "--include-dashboard=true",  # the state API (list_actors) is served by it
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={self.temp}",
            "--disable-usage-stats",
        ]
        self.head: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600) -> None:
        import httpx

        self.head = subprocess.Popen(
            self.head_argv,
            env=self.env,
            stdout=open(self.tmp / "head.log", "w"),  # noqa: SIM115 - the process holds it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(lambda: httpx.get(f"{self.dashboard}/api/version", timeout=2).status_code == 200, timeout_s, "head")
        argv = ["serve", "--config", str(self.tmp / "serve.yaml"), "--output", str(self.tmp / "out")]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *argv, "--port", str(self.http)],
            cwd=REPO,
            env={**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}"},
            stdout=open(self.tmp / "serve.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait(lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200, timeout_s, "imagefab serve")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc, name in ((self.head, "head"), (self.server, "serve")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {(self.tmp / f'{name}.log').read_text()[-3000:]}")
            try:
                if ready():
                    return
            except Exception:  # not up yet: connection refused, a 503 while Serve deploys
                pass
            time.sleep(1)
        raise RuntimeError(f"{what} not ready after {timeout_s:g} s")

    def processes(self) -> dict[str, int]:
        """name -> pid: each live actor (by class, with a replica's id), the serve driver and the
        head's own processes."""
        import psutil
        from ray.util.state import list_actors

        procs: dict[str, int] = {}
        assert self.server is not None and self.head is not None
        procs["driver (imagefab serve)"] = self.server.pid
        for a in list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
            # A replica by its deployment and replica id; the proxy and controller by class.
            name = a.class_name
            if a.class_name.startswith("ServeReplica") and a.name:
                name = f"{a.class_name} #{a.name.rsplit('#', 1)[-1]}"
            if a.pid:
                procs[name] = a.pid
        actor_pids = set(procs.values())
        for child in psutil.Process(self.head.pid).children(recursive=True):
            try:
                if child.pid in actor_pids or child.name().startswith("ray::"):
                    continue  # actors are named above; idle pooled workers come and go
                procs[f"head: {process_name(child.cmdline())}"] = child.pid
            except psutil.Error:
                continue
        return procs

    def stop(self, keep_logs: bool = False) -> None:
        for proc, sig, wait in ((self.server, signal.SIGINT, 120), (self.head, signal.SIGTERM, 60)):
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if keep_logs and (self.temp / "session_latest" / "logs").is_dir():
            shutil.copytree(self.temp / "session_latest" / "logs", self.tmp / "ray-logs", dirs_exist_ok=True)
        shutil.rmtree(self.temp, ignore_errors=True)


# --- the hold --------------------------------------------------------------------------------------


@dataclass
class Minute:
    index: int
    sent: int = 0
    ok_latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    load_avg: float | None = None
    rss_mb: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "minute": self.index,
            "sent": self.sent,
            "ok": len(self.ok_latencies),
            "errors": self.errors,
            "p50_s": percentile(self.ok_latencies, 50),
            "p99_s": percentile(self.ok_latencies, 99),
            "max_s": max(self.ok_latencies, default=None),
            "load_avg_1m": self.load_avg,
            "rss_mb": self.rss_mb,
        }


def cpu_seconds(pid: int) -> float | None:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def machine_cpu() -> dict[str, float]:
    """The machine's CPU time by kind (s), from /proc/stat's first line (Linux)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {n: int(v) / tick for n, v in zip(names, fields, strict=False)}


class Trace:
    """Once a second during the hold: requests answered and the slowest of them, the busiest
    processes' CPU use (% of one core) and the machine's idle, I/O wait and steal time, so that a latency
    burst can be laid beside what the machine was doing."""

    def __init__(self, procs: dict[str, int]):
        self.procs = procs
        self.lock = threading.Lock()
        self.done: list[float] = []  # latencies answered since the last tick
        self.seconds: list[dict] = []

    def answered(self, latency: float) -> None:
        with self.lock:
            self.done.append(latency)

    def run(self, start: float, seconds: int, stop: threading.Event) -> None:
        last_cpu = {n: cpu_seconds(p) for n, p in self.procs.items()}
        last_machine, last_t = machine_cpu(), time.monotonic()
        for i in range(seconds):
            if stop.wait(max(0.0, start + i + 1 - time.monotonic())):
                return
            now_cpu = {n: cpu_seconds(p) for n, p in self.procs.items()}
            now_machine, now_t = machine_cpu(), time.monotonic()
            wall = max(now_t - last_t, 1e-6)
            with self.lock:
                done, self.done = self.done, []
            busy = {
                n: round(100 * (now_cpu[n] - last_cpu[n]) / wall)  # type: ignore[operator]
                for n in now_cpu
                if now_cpu[n] is not None and last_cpu.get(n) is not None
            }
            delta = {k: now_machine[k] - last_machine.get(k, 0.0) for k in now_machine}
            total = sum(delta.values()) or 1e-6
            self.seconds.append(
                {
                    "second": i,
                    "answered": len(done),
                    "max_latency_s": round(max(done), 3) if done else None,
                    "cpu_pct": {n: v for n, v in sorted(busy.items(), key=lambda kv: -kv[1])[:6] if v > 0},
                    "idle_pct": round(100 * delta.get("idle", 0.0) / total),
                    "iowait_pct": round(100 * delta.get("iowait", 0.0) / total),
                    "niced_pct": round(100 * delta.get("nice", 0.0) / total),  # other work given way to
                    "steal_pct": round(100 * delta.get("steal", 0.0) / total),
                }
            )
            last_cpu, last_machine, last_t = now_cpu, now_machine, now_t


PROBE_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def hold(
    base_url: str,
    rate: float,
    minutes: float,
    sample,
    timeout_s: float = 120.0,
    clients: int = 32,
    trace: Trace | None = None,
) -> list[Minute]:
    """Requests due every 1/rate s for `minutes`; `sample()` (name -> RSS MB) runs once a minute;
    `trace`, when given, records every second."""
    import httpx

    total = int(rate * minutes * 60)
    buckets = [Minute(i) for i in range(int(minutes + 0.999))]
    lock = threading.Lock()
    nxt = iter(range(total))

    # The clients are made before the clock starts: making one (its TLS context) takes a while
    # on a busy machine, and would count as latency of the first requests.
    https = [
        httpx.Client(base_url=base_url, timeout=timeout_s, headers={"Authorization": f"Bearer {KEY}"})
        for _ in range(clients)
    ]

    def client(http: httpx.Client) -> None:
        with http:
            while True:
                with lock:
                    k = next(nxt, None)
                if k is None:
                    return
                due = start + k / rate
                time.sleep(max(0.0, due - time.monotonic()))
                body = {"prompt": f"soak request {k}", "seed": k, "combination": "plain"}
                try:
                    status: int | str = http.post("/v1/generate", json=body).status_code
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.monotonic() - due  # from when it was due: waiting for a free client counts
                minute = buckets[min(len(buckets) - 1, int((due - start) // 60))]
                with lock:
                    minute.sent += 1
                    if status == 200:
                        minute.ok_latencies.append(took)
                    else:
                        minute.errors[str(status)] = minute.errors.get(str(status), 0) + 1
                if trace is not None:
                    trace.answered(took)

    start = time.monotonic() + 0.5
    threads = [threading.Thread(target=client, args=(http,), daemon=True) for http in https]
    stop = threading.Event()  # only for a hold cut short: the trace ends on its own after its last second
    tracer = None
    if trace is not None:
        tracer = threading.Thread(target=trace.run, args=(start, int(minutes * 60), stop), daemon=True)
        tracer.start()
    for t in threads:
        t.start()
    try:
        for m in buckets:  # the sample at the end of each minute (or of a hold shorter than one)
            time.sleep(max(0.0, start + min(m.index + 1, minutes) * 60 - time.monotonic()))
            m.load_avg = os.getloadavg()[0]
            m.rss_mb = sample()
        for t in threads:
            t.join(timeout_s + 5)
        if tracer is not None:
            tracer.join(max(0.0, start + minutes * 60 - time.monotonic()) + 5)
    finally:
        stop.set()
    return buckets


def probe_capacity(
    base_url: str, peak: float, bound_s: float, seconds: float, fractions: tuple[float, ...]
) -> tuple[float | None, list[dict]]:
    """The highest open-loop rate the server keeps up with: requests evenly spaced, as in the hold,
    at each fraction of the closed-loop peak in turn (highest first) for `seconds`; the first rate
    where every request is answered 200 with p99 latency within `bound_s` is the capacity.

    The closed-loop peak alone overstates what an open-loop arrival gets: its clients keep the
    batcher's batches full, while requests arriving one by one, spaced, are batched in ones and twos
    (on the tiny CPU model, 4.2 images/s one at a time against 7.0 in batches of 8), so a hold at
    80 % of that peak runs close to saturation and its latency comes in bursts."""
    probes = []
    for fraction in fractions:
        rate = fraction * peak
        (m,) = hold(base_url, rate, seconds / 60, sample=dict)
        p99 = percentile(m.ok_latencies, 99)
        kept_up = not m.errors and p99 is not None and p99 <= bound_s
        probes.append(
            {
                "fraction_of_peak": fraction,
                "rate_requests_per_s": rate,
                "sent": m.sent,
                "ok": len(m.ok_latencies),
                "errors": m.errors,
                "p50_s": percentile(m.ok_latencies, 50),
                "p99_s": p99,
                "kept_up": kept_up,
            }
        )
        print(
            f"probe: {rate:.2f} requests/s open-loop ({fraction:.0%} of peak): p99 {p99 or 0:.3f} s "
            f"(bound {bound_s:.3f} s), {sum(m.errors.values())} not 200 -> {'kept up' if kept_up else 'fell behind'}",
            flush=True,
        )
        if kept_up:  # (a probe ends when its last request is answered: no backlog is left)
            return rate, probes
    return None, probes


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minute, value) points, per minute; None with fewer than 2 points."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def rss_series(start: dict[str, float | None], minutes: list[Minute]) -> dict[str, list[float | None]]:
    """name -> RSS (MB) at the start of the hold, then at the end of each minute."""
    return {name: [start.get(name), *(m.rss_mb.get(name) for m in minutes)] for name in start}


def late_slopes(series: dict[str, list[float | None]]) -> dict[str, float | None]:
    """name -> RSS slope over the last half of the hold, KB per minute (a flat process: near 0).
    Point i of a series is minute i (0: the start of the hold)."""
    out = {}
    for name, values in series.items():
        half = (len(values) - 1) / 2
        points = [(float(i), v * 1024) for i, v in enumerate(values) if v is not None and i >= half]
        out[name] = slope_per_min(points)
    return out


def growth(first: dict[str, float | None], last: dict[str, float | None]) -> dict[str, dict]:
    return {
        name: {"start_mb": first[name], "end_mb": last.get(name), "growth_mb": last[name] - first[name]}  # type: ignore[operator]
        for name in first
        if first[name] is not None and last.get(name) is not None
    }


def soak_serve(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="imagefab-soak-"))
    server = LocalServe(tmp, args.steps, args.size, args.max_in_flight)
    try:
        server.start()
        run_level(server.url, 1, 5.0)  # warm-up: the pipeline loaded, the first batches done
        ramp = []
        for c in args.ramp:
            r = run_level(server.url, c, args.ramp_seconds)
            ramp.append(
                {
                    "clients": c,
                    "ok": len(r.ok_latencies),
                    "errors": r.errors,
                    "images_per_s": r.throughput,
                    "p50_s": percentile(r.ok_latencies, 50),
                }
            )
            print(f"ramp: {c} client(s): {r.throughput:.2f} images/s, {r.errors} not 200", flush=True)
        peak = max(level["images_per_s"] for level in ramp)
        alone = min(level["p50_s"] for level in ramp if level["p50_s"] is not None)  # one request, no queue
        bound = args.probe_bound * alone
        capacity, probes = probe_capacity(server.url, peak, bound, args.probe_seconds, PROBE_FRACTIONS)
        if capacity is None:
            raise RuntimeError(
                f"the server kept up with no open-loop rate down to {PROBE_FRACTIONS[-1]:.0%} of its closed-loop "
                f"peak ({peak:.2f} images/s) within p99 {bound:.3f} s: {probes}"
            )
        rate = args.load * capacity
        procs = server.processes()  # the replicas, proxy and controller are all up after the ramp

        def sample() -> dict[str, float | None]:
            return {name: rss_mb(pid) for name, pid in procs.items()}

        start_rss = sample()
        print(
            f"hold: {rate:.2f} requests/s ({args.load:.0%} of the open-loop capacity {capacity:.2f}) "
            f"for {args.minutes:g} min",
            flush=True,
        )
        trace = Trace(procs) if args.trace else None
        minutes = hold(server.url, rate, args.minutes, sample, trace=trace)
        for m in minutes:
            d = m.to_dict()
            print(
                f"  minute {d['minute'] + 1}: {d['ok']}/{d['sent']} ok, p50 {d['p50_s'] or 0:.3f} s, "
                f"p99 {d['p99_s'] or 0:.3f} s, load {d['load_avg_1m']:.2f}",
                flush=True,
            )
        end_rss = minutes[-1].rss_mb
    finally:
        server.stop(keep_logs=args.keep)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = [lat for m in minutes for lat in m.ok_latencies]
    errors: dict[str, int] = {}
    for m in minutes:
        for k, v in m.errors.items():
            errors[k] = errors.get(k, 0) + v
    return {
        "kind": "serve",
        "setup": {
            "model": "tiny-sdxl",
            "size": args.size,
            "steps": args.steps,
            "generator_replicas": 1,
            "max_in_flight": args.max_in_flight,
        },
        "ramp": ramp,
        "closed_loop_peak_images_per_s": peak,
        "probe_bound_s": bound,
        "probes": probes,
        "capacity_images_per_s": capacity,
        "load": args.load,
        "rate_requests_per_s": rate,
        "minutes": [m.to_dict() for m in minutes],
        "requests": sum(m.sent for m in minutes),
        "ok": len(ok),
        "errors": errors,
        "p50_s": percentile(ok, 50),
        "p99_s": percentile(ok, 99),
        "pids": procs,
        "rss_mb_start": start_rss,
        "rss_mb_end": end_rss,
        "rss_growth": growth(start_rss, end_rss),
        "rss_series_mb": (series := rss_series(start_rss, minutes)),
        "rss_slope_last_half_kb_per_min": late_slopes(series),
    } | ({"seconds": trace.seconds} if trace is not None else {})


# --- the bulk driver ---------------------------------------------------------------------------------


def soak_bulk(args: argparse.Namespace) -> dict:
    """One bulk run of `--bulk-images` with the stand-in generator; the driver's RSS against the
    images catalogued so far (the catalog's batch files x the batch size)."""
    import ray

    from app.spec import load_spec
    from benchmarks.standin import StandInGenerator
    from jobs.generate import run

    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    tmp = Path(tempfile.mkdtemp(prefix="imagefab-soak-bulk-"))
    batch = 16
    rows = "\n".join(f"{i},product shot {i},{i}" for i in range(args.bulk_images))
    (tmp / "rows.csv").write_text("key,prompt,seed\n" + rows + "\n")
    (tmp / "job.yaml").write_text(
        textwrap.dedent(f"""\
        run_name: soak-bulk
        input: {{path: rows.csv, prompt_column: prompt, key_column: key}}
        size: 64x64
        steps: 1
        qc: {{enabled: [sharpness, contrast, exposure, blank, nonfinite]}}
        postprocess: {{presets: [thumbnail], format: jpeg}}
        compute: {{batch_size: {batch}, qc_workers: 1}}
    """)
    )
    spec = load_spec(tmp / "job.yaml", {"output.uri": str(tmp / "out")})
    samples: list[tuple[float, int, float]] = []  # (s since start, images catalogued, driver RSS MB)
    done = threading.Event()
    t0 = time.perf_counter()

    def sampler() -> None:
        while not done.wait(1.0):
            parts = len(list((tmp / "out" / "catalog").glob("*/*/part-*.parquet")))
            samples.append((time.perf_counter() - t0, parts * batch, rss_mb(os.getpid()) or 0.0))

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        summary = run(spec, quiet=True, generator_cls=StandInGenerator.at_rate(1000.0))
    finally:
        done.set()
        thread.join()
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    n = summary.rendered
    streaming = [s for s in samples if 0 < s[1] < n]  # while images flowed: before compaction
    at = {}
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        hit = next((s for s in streaming if s[1] >= frac * n), streaming[-1] if streaming else None)
        if hit is not None:
            at[f"{frac:.0%}"] = {"images": hit[1], "rss_mb": hit[2], "s": hit[0]}
    first, last = at.get("10%"), at.get("100%")
    return {
        "kind": "bulk",
        "images": n,
        "counts": summary.counts,
        "streaming_images_per_s": summary.streaming_images_per_second,
        "wall_s": summary.wall_seconds,
        "driver_rss_at": at,
        "driver_rss_growth_mb": (last["rss_mb"] - first["rss_mb"]) if first and last else None,
        "driver_rss_peak_mb": max((s[2] for s in samples), default=None),
        "samples": samples,
    }


# --- entry ---------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "diffusers", "ray")} | {"python": platform.python_version()}


def markdown(result: dict) -> str:
    if result["kind"] == "bulk":
        lines = ["| images catalogued | driver RSS (MB) |", "|---:|---:|"]
        lines += [f"| {v['images']} ({k}) | {v['rss_mb']:.0f} |" for k, v in result["driver_rss_at"].items()]
        return "\n".join(lines)
    lines = [
        "| minute | sent | 200 | errors | p50 (s) | p99 (s) | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["minutes"]:
        lines.append(
            f"| {m['minute'] + 1} | {m['sent']} | {m['ok']} | {sum(m['errors'].values())} | {m['p50_s'] or 0:.3f} "
            f"| {m['p99_s'] or 0:.3f} | {m['load_avg_1m']:.2f} |"
        )
    lines += [
        "",
        "| process | RSS start (MB) | RSS end (MB) | growth (MB) | slope, last half (KB/min) |",
        "|---|---:|---:|---:|---:|",
    ]
    slopes = result.get("rss_slope_last_half_kb_per_min", {})
    for name, g in sorted(result["rss_growth"].items()):
        slope = slopes.get(name)
        lines.append(
            f"| {name} | {g['start_mb']:.0f} | {g['end_mb']:.0f} | {g['growth_mb']:+.1f} "
            f"| {'' if slope is None else f'{slope:+.0f}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the hold at steady load")
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity to hold")
    p.add_argument("--ramp", type=int, nargs="+", default=[1, 2, 4, 8], help="client counts of the capacity ramp")
    p.add_argument("--ramp-seconds", type=float, default=20.0)
    p.add_argument("--probe-seconds", type=float, default=40.0, help="length of each open-loop capacity probe")
    p.add_argument(
        "--probe-bound",
        type=float,
        default=4.0,
        help="a probe keeps up when its p99 is within this many times one request's latency alone",
    )
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="128x128")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=64,
        help="limits.max_in_flight: room to queue, not to shed, at the held load",
    )
    p.add_argument("--max-growth-mb", type=float, default=50.0, help="fail when an RSS grows more than this")
    p.add_argument("--bulk-images", type=int, default=0, help="measure a bulk run's driver instead")
    p.add_argument("--out", help="JSON file (default benchmarks/runs/<date>-cpu-soak[-bulk].json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, Ray's logs, outputs)")
    p.add_argument("--trace", action="store_true", help="record every second: answers, CPU per process, idle and steal")
    args = p.parse_args(argv)
    if not 0 < args.load <= 1:
        p.error(f"--load must be in (0, 1], not {args.load}")

    started = datetime.now(UTC)
    result = soak_bulk(args) if args.bulk_images else soak_serve(args)
    result |= {
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started.strftime("%Y-%m-%d"),
        "started_at": started.isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "versions": versions(),
    }
    kind = "cpu-soak-bulk" if args.bulk_images else "cpu-soak"
    out = Path(args.out or REPO / "benchmarks" / "runs" / f"{started:%Y-%m-%d}-{kind}.json")
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nwritten: {out}")
    if result["kind"] == "bulk":
        grew = result["driver_rss_growth_mb"] or 0.0
        return 1 if grew > args.max_growth_mb else 0
    grown = {n: g["growth_mb"] for n, g in result["rss_growth"].items() if g["growth_mb"] > args.max_growth_mb}
    if result["errors"] or grown:
        print(f"FAILED: errors {result['errors']}, RSS grown past {args.max_growth_mb:g} MB: {grown}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
