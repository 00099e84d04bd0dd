"""What the ingress's C heap keeps per request, with trimming taken out of the picture.

    python -m benchmarks.heap_growth [--malloc-arena-max 2] [--intervals 8] [--seconds 60] [--clients 3]

A local cluster and `imagefab serve` on the tiny model as in benchmarks/soak.py (128x128, 2 steps),
then `--intervals` intervals of `--clients` closed-loop clients for `--seconds` each. After each one,
inside the ingress replica's process (Ray's `__ray_call__`): a garbage collection, `malloc_trim(0)`,
then its RSS, glibc's `mallinfo2` (the arenas' extent, the bytes in use and free in them) and the
number of arenas (`malloc_info`). The RSS after a trim is what the process cannot give back: a
growth of it with the requests served is memory kept, live or pinned by fragmentation.

`--malloc-arena-max` is set as MALLOC_ARENA_MAX for the whole local cluster; the ingress keeps it
(app/serve/heap.py caps it at 2 where it is unset). glibc's own default on a machine is 8 arenas
per core: pass that (16 on 2 cores) to see the uncapped ingress.

Writes JSON to benchmarks/runs/ (or `--out`) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.load import run_level
from benchmarks.soak import REPO, LocalServe, versions


def heap_inside(actor) -> dict:
    """Runs in the ingress replica's process: trimmed RSS and glibc's view of its heap (MB)."""
    import ctypes
    import gc
    import os
    from pathlib import Path

    from app.serve.heap import HeapTrimmer, malloc_arenas

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    gc.collect()
    untrimmed = rss_mb()
    HeapTrimmer(interval_s=0).maybe_trim()  # malloc_trim(0), as the ingress does when idle
    trimmed = rss_mb()
    info = libc.mallinfo2()
    arenas = malloc_arenas()
    return {
        "rss_mb": untrimmed,
        "trimmed_rss_mb": trimmed,
        "arena_extent_mb": info.arena / 2**20,
        "in_use_mb": info.uordblks / 2**20,
        "free_in_arenas_mb": info.fordblks / 2**20,
        "mmapped_mb": info.hblkhd / 2**20,
        "arenas": arenas,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
    }


def measure(args: argparse.Namespace) -> dict:
    import ray

    os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)  # the cluster's processes inherit it
    tmp = Path(tempfile.mkdtemp(prefix="imagefab-heap-"))
    server = LocalServe(tmp, 2, "128x128", 64)
    intervals = []
    try:
        server.start()
        ray.init(address=f"127.0.0.1:{server.gcs}", log_to_driver=False)
        run_level(server.url, 1, 5.0)  # warm-up: the pipeline loaded, every stage run once
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"])
        ingress = ray.get_actor(name, namespace="serve")
        served = 0
        for i in range(args.intervals + 1):
            if i:
                level = run_level(server.url, args.clients, args.seconds)
                served += len(level.ok_latencies)
                if level.requests != len(level.ok_latencies):
                    raise RuntimeError(
                        f"interval {i}: {level.requests - len(level.ok_latencies)} requests not answered 200"
                    )
            time.sleep(2)  # the metrics reports sent without waiting have arrived
            m = ray.get(ingress.__ray_call__.remote(heap_inside)) | {"interval": i, "requests": served}
            intervals.append(m)
            print(
                f"interval {i}: {served} requests, RSS {m['trimmed_rss_mb']:.1f} MB trimmed, "
                f"arenas {m['arenas']} ({m['arena_extent_mb']:.1f} MB, {m['free_in_arenas_mb']:.1f} free)",
                flush=True,
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    first, last = intervals[1], intervals[-1]  # from the end of the first interval: warm
    half = intervals[len(intervals) // 2]
    per_request = (
        (last["trimmed_rss_mb"] - first["trimmed_rss_mb"]) * 2**20 / max(1, last["requests"] - first["requests"])
    )
    late = (last["trimmed_rss_mb"] - half["trimmed_rss_mb"]) * 2**20 / max(1, last["requests"] - half["requests"])
    return {
        "intervals": intervals,
        "trimmed_growth_mb": last["trimmed_rss_mb"] - first["trimmed_rss_mb"],
        "bytes_per_request": per_request,
        "bytes_per_request_last_half": late,
    }


def markdown(result: dict) -> str:
    lines = [
        "| interval | requests | RSS trimmed (MB) | arenas | arena extent (MB) | in use (MB) | free in arenas (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["intervals"]:
        lines.append(
            f"| {m['interval']} | {m['requests']} | {m['trimmed_rss_mb']:.1f} | {m['arenas']} | "
            f"{m['arena_extent_mb']:.1f} | {m['in_use_mb']:.1f} | {m['free_in_arenas_mb']:.1f} |"
        )
    lines.append(
        f"\nfrom interval 1: {result['trimmed_growth_mb']:+.1f} MB, {result['bytes_per_request']:.0f} B a request "
        f"({result['bytes_per_request_last_half']:.0f} B over the last half)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--malloc-arena-max", type=int, default=2, help="MALLOC_ARENA_MAX of the cluster's processes")
    p.add_argument("--intervals", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="each interval's length")
    p.add_argument("--clients", type=int, default=3, help="closed-loop clients in an interval")
    p.add_argument("--out", help="JSON file (default benchmarks/runs/<date>-cpu-heap-growth-arenas<N>.json)")
    args = p.parse_args(argv)
    if args.malloc_arena_max < 1 or args.intervals < 2:
        p.error("--malloc-arena-max must be 1 or more and --intervals 2 or more")
    started = datetime.now(UTC)
    result = measure(args) | {
        "command": "python -m benchmarks.heap_growth " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "versions": versions(),
    }
    name = f"{started:%Y-%m-%d}-cpu-heap-growth-arenas{args.malloc_arena_max}.json"
    out = Path(args.out or REPO / "benchmarks" / "runs" / name)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
