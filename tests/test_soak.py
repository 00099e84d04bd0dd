"""The soak benchmark's memory verdict: an RSS series per process and its slope over the last half."""

from __future__ import annotations

import os
import time

import pytest

from benchmarks.soak import Minute, Trace, hold, late_slopes, markdown, probe_capacity, rss_series, slope_per_min


def test_slope_is_the_least_squares_rate_per_minute():
    assert slope_per_min([(0, 5.0), (1, 7.0), (2, 9.0)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 3.0), (1, 5.0), (2, 3.0), (3, 5.0)]) == pytest.approx(0.4)
    assert slope_per_min([(4, 1.0)]) is None


def test_rss_series_starts_at_the_hold_and_the_slope_reads_only_its_last_half():
    start = {"ingress": 900.0, "proxy": 200.0, "gone": 50.0}
    minutes = [
        Minute(i, rss_mb={"ingress": 900.0 + 10 * min(i + 1, 2), "proxy": 200.0, "gone": None}) for i in range(6)
    ]
    series = rss_series(start, minutes)
    assert series["ingress"] == [900.0, 910.0, 920.0, 920.0, 920.0, 920.0, 920.0]
    assert series["gone"] == [50.0, None, None, None, None, None, None]
    slopes = late_slopes(series)
    # A warm-up of 20 MB in the first two minutes, then flat: the last half (minutes 3-6) says 0 KB/min.
    assert slopes["ingress"] == pytest.approx(0.0)
    assert slopes["proxy"] == pytest.approx(0.0)
    assert slopes["gone"] is None
    growing = late_slopes({"leaky": [900.0 + 0.5 * i for i in range(11)]})
    assert growing["leaky"] == pytest.approx(512.0)  # 0.5 MB a minute


def test_markdown_shows_the_slope_beside_the_growth():
    result = {
        "kind": "serve",
        "minutes": [{"minute": 0, "sent": 10, "ok": 10, "errors": {}, "p50_s": 0.2, "p99_s": 0.4, "load_avg_1m": 1.0}],
        "rss_growth": {"ingress": {"start_mb": 900.0, "end_mb": 901.0, "growth_mb": 1.0}},
        "rss_slope_last_half_kb_per_min": {"ingress": 12.4},
    }
    text = markdown(result)
    assert "slope, last half (KB/min)" in text
    assert "| ingress | 900 | 901 | +1.0 | +12 |" in text


@pytest.fixture
def one_at_a_time_server():
    """A loopback HTTP server answering POST /v1/generate one request at a time, 0.2 s each: an
    open-loop capacity of 5 requests/s, whatever the clients' concurrency."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    busy = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with busy:
                time.sleep(0.2)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_capacity_is_the_highest_open_loop_rate_kept_up_with(one_at_a_time_server):
    # 8 requests/s against 5 served: the queue grows 3 a second, the last ones wait ~3 s. Half of
    # that, 4/s, is served as it comes (0.2 s each; the bound leaves room for a busy machine).
    capacity, probes = probe_capacity(one_at_a_time_server, peak=8.0, bound_s=1.5, seconds=5, fractions=(1.0, 0.5))
    assert [p["kept_up"] for p in probes] == [False, True]
    assert capacity == pytest.approx(4.0)
    assert probes[0]["p99_s"] > 1.5 and probes[1]["p99_s"] <= 1.5
    assert all(p["ok"] == p["sent"] and not p["errors"] for p in probes)


def test_the_trace_lays_answers_beside_cpu_each_second(one_at_a_time_server):
    trace = Trace({"this test": os.getpid()})
    (minute,) = hold(one_at_a_time_server, 3.0, 3 / 60, sample=dict, trace=trace)
    assert len(minute.ok_latencies) == 9
    assert [s["second"] for s in trace.seconds] == [0, 1, 2]
    assert 1 <= sum(s["answered"] for s in trace.seconds) <= 9  # the last ones may land after the last tick
    assert all(0 <= s["idle_pct"] <= 100 and s["iowait_pct"] >= 0 and s["steal_pct"] >= 0 for s in trace.seconds)
    assert all(s["max_latency_s"] is None or s["max_latency_s"] >= 0.2 for s in trace.seconds)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_the_heap_probe_reads_a_trimmed_rss_and_the_arenas():
    """benchmarks.heap_growth's probe, run here instead of in the ingress: memory freed between live
    blocks is resident before its trim and gone after it; glibc reports its arenas."""
    import platform

    import numpy as np

    from benchmarks.heap_growth import heap_inside

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim and mallinfo2 are glibc's")
    blocks = [np.ones(64 * 1024, dtype=np.uint8) for _ in range(1024)]  # 64 MB below the mmap threshold
    kept = blocks[::16]
    del blocks
    m = heap_inside(None)
    assert m["rss_mb"] - m["trimmed_rss_mb"] > 30, m
    assert m["arenas"] >= 1 and m["arena_extent_mb"] >= m["in_use_mb"] > 0, m
    assert m["malloc_arena_max"] == os.environ.get("MALLOC_ARENA_MAX")
    assert len(kept) == 64
