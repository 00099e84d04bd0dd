"""One timing pass over an existing catalog, for comparing two versions of the code on the same rows.

    PYTHONPATH=<checkout> python benchmarks/catalog_pass.py OUTPUT RESULT.json [--search]

Times, in this fresh process: `connect`, every named query fetching all its rows, the first page
and the total of each query answering with more than a page (what `imagefab query NAME` prints),
two searches, the report (no thumbnails) and the review list's first page twice. Each step has its
wall seconds, the process's CPU seconds (every thread's: steadier than wall time when other work
shares the cores) and the 1-minute load average when it started. Run it alternately from two
checkouts (the file imports the code on PYTHONPATH, so the same file times either).
`--search`: only `connect` and three searches ("red leather boot", "ceramic mug studio", the first
again), with their rows in the result to compare two versions' rankings.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_pass(output_uri: str) -> dict[str, dict[str, float]]:
    import analysis
    from analysis.queries import QUERIES, count_query
    from app.review import pending_page
    from app.storage import OutputStore
    from benchmarks.catalog_scale import PAGE, PARAMS

    out: dict[str, dict[str, float]] = {}

    def timed(name: str, fn: Callable):
        load = _load()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        out[name] = {
            "wall_s": round(time.perf_counter() - wall, 3),
            "cpu_s": round(time.process_time() - cpu, 3),
            "load": load,
        }
        return result

    output = OutputStore.at(output_uri)
    con = timed("connect", lambda: analysis.connect(output))
    listing = []
    for name, q in QUERIES.items():
        params = {p.name: v for p in q.params if p.required and (v := PARAMS.get(p.name))}
        _, rows = timed(f"query {name}", partial(analysis.run_query, con, name, params))
        if len(rows) > PAGE:
            listing.append((name, params))
    for name, params in listing:
        page = partial(analysis.run_query, con, name, params, limit=PAGE)
        total = partial(count_query, con, name, params)
        timed(f"query {name} (page + total)", lambda page=page, total=total: (page(), total()))
    timed("search", lambda: analysis.search(con, "red leather boot", limit=20))
    timed("search (2nd)", lambda: analysis.search(con, "ceramic mug studio", limit=20))
    timed("report", lambda: analysis.build_report(output, max_thumbs=0))
    timed("review list", lambda: pending_page(output, limit=PAGE))
    timed("review list (2nd)", lambda: pending_page(output, limit=PAGE))
    return out


SEARCHES = (
    ("search", "red leather boot"),
    ("search (2nd)", "ceramic mug studio"),
    ("search (3rd)", "red leather boot"),
)


def search_pass(output_uri: str) -> tuple[dict[str, dict[str, float]], dict[str, list[list[str]]]]:
    """`connect`, then SEARCHES: the timings and each search's rows (as text)."""
    import analysis
    from app.storage import OutputStore

    out: dict[str, dict[str, float]] = {}
    rows: dict[str, list[list[str]]] = {}
    load = _load()
    wall, cpu = time.perf_counter(), time.process_time()
    con = analysis.connect(OutputStore.at(output_uri))
    out["connect"] = {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "load": load,
    }
    for name, text in SEARCHES:
        load = _load()
        wall, cpu = time.perf_counter(), time.process_time()
        _, found = analysis.search(con, text, limit=20)
        out[name] = {
            "wall_s": round(time.perf_counter() - wall, 3),
            "cpu_s": round(time.process_time() - cpu, 3),
            "load": load,
        }
        rows[name] = [[str(v) for v in r] for r in found]
    return out, rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    search_only = "--search" in args
    args = [a for a in args if a != "--search"]
    if len(args) != 2:
        print("usage: python benchmarks/catalog_pass.py OUTPUT RESULT.json [--search]", file=sys.stderr)
        return 2
    if search_only:
        result, rows = search_pass(args[0])
        body: dict = {"steps": result, "rows": rows}
    else:
        result = run_pass(args[0])
        body = result
    with open(args[1], "w") as f:
        json.dump(body, f, indent=1)
    for name, r in result.items():
        print(f"{name}: {r['wall_s']:.3f} s wall, {r['cpu_s']:.3f} s CPU, load {r['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
