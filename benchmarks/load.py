"""Bounded load on the Serve app over loopback, on the tiny models: C concurrent clients for T seconds.

    python -m benchmarks.load [--concurrency 2 4 8] [--seconds 20] [--max-in-flight 4]

Starts a local Ray and the Serve app on a free 127.0.0.1 port with `limits.max_in_flight` set to a
known bound, then for each concurrency level runs C closed-loop clients: each sends its next
request when the previous one is answered (after a 503, once a short pause is over). Every level
stops by itself after T seconds, every request after `--timeout` seconds. Prints a Markdown table
per level: requests, answered 200, refused 503, any other outcome (a 5xx, a 504, a client
timeout), p50 / p99 latency of the 200s and their throughput.

What must hold: at or below the bound, no request fails; above it, the excess is refused at once
with 503 + Retry-After, never left to time out. tests/test_load.py runs a short version in CI.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

KEY = "load-test-key-0123456789abcdef"


@dataclass
class LevelResult:
    concurrency: int
    seconds: float  # wall time of the level
    ok_latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    busy_latencies: list[float] = field(default_factory=list)  # seconds, 503s only: how fast a refusal comes
    other: dict[str, int] = field(default_factory=dict)  # any other outcome: "504", "500", "timeout", …

    @property
    def busy(self) -> int:
        return len(self.busy_latencies)

    @property
    def requests(self) -> int:
        return len(self.ok_latencies) + self.busy + sum(self.other.values())

    @property
    def errors(self) -> int:
        """Every request not answered 200, 503 included."""
        return self.requests - len(self.ok_latencies)

    def percentile(self, p: float, latencies: list[float] | None = None) -> float:
        lat = sorted(self.ok_latencies if latencies is None else latencies)
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

    @property
    def throughput(self) -> float:
        return len(self.ok_latencies) / self.seconds if self.seconds else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    max_in_flight: int, steps: int = 2, size: str = "128x128", output: str | None = None, port: int | None = None
) -> str:
    """The Serve app on loopback with the tiny models; returns its base URL (Ray started if needed)."""
    import ray
    from ray import serve

    from app.serve.app import build_app
    from app.serve.config import load_serve_config

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = port or free_port()
    width, _, height = size.partition("x")
    config = load_serve_config(
        None,
        output_uri=output or tempfile.mkdtemp(prefix="imagefab-load-"),
        port=port,
        steps=steps,
        api_keys=[KEY],
        default_size=size,
        combinations={"plain": {}},
        # A short batch window: concurrent requests share generator calls, as in production.
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        limits={
            "max_in_flight": max_in_flight,
            "max_side": max(int(width), int(height)),
            "max_pixels": int(width) * int(height),
            "request_timeout_s": 120,
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="imagefab-load", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def run_level(
    base_url: str, concurrency: int, seconds: float, *, timeout: float = 60.0, busy_pause: float = 0.1
) -> LevelResult:
    """C closed-loop clients for `seconds`; each request is one 128x128 image (distinct prompt)."""
    import httpx

    result = LevelResult(concurrency=concurrency, seconds=seconds)
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {KEY}"}) as http:
            i = 0
            while time.monotonic() < deadline:
                body = {"prompt": f"load test client {k} request {i}", "seed": k * 100_000 + i, "combination": "plain"}
                i += 1
                t0 = time.perf_counter()
                try:
                    status = http.post("/v1/generate", json=body).status_code
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        result.ok_latencies.append(took)
                    elif status == 503:
                        result.busy_latencies.append(took)
                    else:
                        result.other[str(status)] = result.other.get(str(status), 0) + 1
                if status == 503:
                    time.sleep(busy_pause)  # a client backing off (the server says Retry-After: 2)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    result.seconds = time.perf_counter() - t0
    return result


def markdown(results: list[LevelResult], bound: int) -> str:
    rows = [
        "| clients | vs bound | requests | 200 | 503 | other | p50 latency (s) | p99 latency (s) | images/s "
        "| 503 answered in, p99 (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        where = "below" if r.concurrency < bound else "at" if r.concurrency == bound else "above"
        other = ", ".join(f"{k}: {v}" for k, v in sorted(r.other.items())) or "0"
        refused_in = f"{r.percentile(99, r.busy_latencies):.3f}" if r.busy_latencies else "–"
        rows.append(
            f"| {r.concurrency} | {where} | {r.requests} | {len(r.ok_latencies)} | {r.busy} | {other} "
            f"| {r.percentile(50):.2f} | {r.percentile(99):.2f} | {r.throughput:.2f} | {refused_in} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    p.add_argument("--max-in-flight", type=int, default=4, help="limits.max_in_flight of the server")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="128x128")
    p.add_argument("--timeout", type=float, default=60.0, help="per request, client side")
    args = p.parse_args(argv)
    for key, value in (
        ("RAY_AUTH_MODE", "disabled"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("HF_HUB_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)

    import ray
    from ray import serve

    base_url = start_server(args.max_in_flight, args.steps, args.size)
    try:
        run_level(base_url, 1, 3.0, timeout=args.timeout)  # warm-up: pipelines loaded, first batch done
        results = [run_level(base_url, c, args.seconds, timeout=args.timeout) for c in args.concurrency]
    finally:
        serve.shutdown()
        ray.shutdown()
    print(
        f"Serve app on loopback, tiny-sdxl {args.size}, {args.steps} steps, one generator replica, "
        f"limits.max_in_flight={args.max_in_flight}, {args.seconds:g} s per level; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print(markdown(results, args.max_in_flight))
    failed = [r for r in results if (r.concurrency <= args.max_in_flight and r.errors) or r.other]
    if failed:
        print(
            f"\nFAILED: errors at or below the bound, or outcomes other than 200/503: "
            f"{[(r.concurrency, r.busy, r.other) for r in failed]}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
