"""The catalog at scale: a year of runs written as batch files, timed before and after compaction.

    python -m benchmarks.catalog_scale --images 1000000 [--per-run 10000] [--batch 4] [--s3] [--json out.json]
        [--batched-runs K --older-batch N] [--rerun-share F] [--no-before] [--dir PATH]

Writes `--images` synthetic catalog rows (every column of app/catalog/schema.py; prompts, tags
and QC values drawn so that queries and search find something) as one Parquet file per batch of
`--batch` rows, in one `date=/run_id=` partition per run, `--per-run` images a run, one run a
day — the layout a team's bulk runs leave. Rows are built column-wise with pyarrow, so the time
goes to writing files, as it does in production. Then it times, on local disk and (`--s3`) on
an S3 API served by moto on loopback: every named query, a search, the HTML report and the
review list (`imagefab review list`: its first page); compacts the catalog (`app.catalog.compact`),
records its throughput, and times them all again. A query that returns a row per image is timed
four ways: every row into Python (`run_query`, `imagefab query NAME --all`), its first page
(`run_query(..., limit=100)`), the page and the total beside it (what `imagefab query NAME` prints),
and every row exported by DuckDB (`imagefab query NAME --out rows.parquet`).

Writing a year as 4-row files is 250,000 files: `--batched-runs K` writes only the newest K runs
that way and the older ones in `--older-batch`-row files, the same rows in fewer files.

    python -m benchmarks.catalog_scale --s3-from DIR [--json out.json]

uploads an output folder already written (its catalog/ and indexes/, e.g. a compacted
`--dir` of an earlier run) to moto on loopback as it is, and times everything twice in one
process: first with an empty local cache of compacted files (app/catalog/cache.py), then warm.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.catalog.schema import CATALOG_SCHEMA, conform
from app.storage import OutputStore

WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "leather",
    "wool",
    "cotton",
    "ceramic",
    "brass",
    "studio",
    "outdoor",
    "soft",
    "light",
    "shadow",
    "boot",
    "scarf",
    "tote",
    "bag",
    "belt",
    "mug",
    "chair",
    "lamp",
    "watch",
    "ring",
    "jacket",
    "sneaker",
]
CATEGORIES = ("footwear", "accessory", "bag", "kitchen", "furniture", "apparel")
STATUSES = np.array(["accepted", "review", "rejected", "failed"])
PARAMS = {  # values for the named queries' parameters
    "lora": "tiny-style",
    "reason": "blur",
    "category": "footwear",
    "key": "category",
    "value": "footwear",
    "month": None,
    "run": None,
}


def synthetic_rows(
    n: int, start: int, day: date, run_id: str, rng: np.random.Generator, rerun: list[str] | None = None
) -> pa.Table:
    """`n` catalog rows of one run, in today's schema; the first rows re-render the ids in
    `rerun` (a regeneration or a resumed failure: a newer row for an image another run wrote)."""
    ids = [f"{start + i:016x}{rng.integers(0, 2**63):016x}" for i in range(n)]
    ids[: len(rerun or [])] = rerun or []
    words = np.array(WORDS)
    picks = rng.integers(0, len(WORDS), size=(n, 5))
    prompts = [" ".join(words[p]) for p in picks]
    status = STATUSES[rng.choice(4, size=n, p=[0.7, 0.15, 0.1, 0.05])]
    created = [datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(seconds=int(s)) for s in range(n)]
    cats = [CATEGORIES[c] for c in rng.integers(0, len(CATEGORIES), n)]
    tags = [[("category", c), ("product_id", f"P-{start + i}")] for i, c in enumerate(cats)]
    has_lora = rng.random(n) < 0.5
    lora = {"name": "tiny-style", "version": "1", "weight": 0.8, "sha256": "1" * 64, "source": "builtin"}
    table = pa.table(
        {
            "image_id": ids,
            "source": pa.array(["bulk"] * n),
            "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
            "status": status,
            "reasons": [["blur"] if s == "rejected" else [] for s in status],
            "error": ["oom: out of memory" if s == "failed" else "" for s in status],
            "prompt": prompts,
            "negative_prompt": pa.array(["blurry, text, watermark"] * n),
            "tags": pa.array(tags, CATALOG_SCHEMA.field("tags").type),
            "template": pa.array([{"name": "product", "version": "1", "text": "{item}"}] * n),
            "base_model": pa.array([{"name": "tiny-sdxl", "version": "1", "sha256": "0" * 64, "source": "b"}] * n),
            "loras": [[lora] if h else [] for h in has_lora],
            "combination": np.where(has_lora, "styled", "base"),
            "steps": pa.array(np.full(n, 30, np.int32)),
            "width": pa.array(np.full(n, 1024, np.int32)),
            "height": pa.array(np.full(n, 1024, np.int32)),
            "seed": pa.array(rng.integers(0, 2**31, n)),
            "sharpness": rng.normal(150, 40, n),
            "contrast": rng.random(n),
            "exposure": rng.random(n),
            "clip_score": rng.random(n),
            "gpu_seconds": rng.random(n) * 4,
            "cpu_seconds": rng.random(n),
            "cost_usd": rng.random(n) * 0.002,
            "accelerator": pa.array(["h100"] * n),
            "uri": [f"images/{i[:2]}/{i}.png" for i in ids],
            "approval": pa.array(["pending"] * n),
            "batch_id": [f"{run_id}-{(start + i) // 4}" for i in range(n)],
        }
    )
    return conform(table)


def write_catalog(
    output: OutputStore,
    images: int,
    batch: int,
    per_run: int,
    seed: int = 0,
    *,
    batched_runs: int | None = None,
    older_batch: int = 1000,
    rerun_share: float = 0.0,
) -> tuple[dict, float]:
    """Write `images` rows, `per_run` a run (one run a day), as one file per `batch` rows.
    batched_runs: only the newest this many runs are written in `batch`-row files, the older ones
    in `older_batch`-row files (fewer, larger files: a cheaper write of the same rows, which
    compaction merges the same way). rerun_share: that share of each run's rows re-renders
    images of the run before (a newer row for an existing image_id in another partition)."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    files = written = runs = rerun_rows = 0
    total_runs = -(-images // per_run)
    day = date(2026, 1, 1)
    previous: list[str] = []
    while written < images:
        n = min(per_run, images - written)
        run_id = f"bench-{day:%Y%m%d}-{written:08x}"
        rerun = previous[: int(n * rerun_share)]
        table = synthetic_rows(n, written, day, run_id, rng, rerun)
        rerun_rows += len(rerun)
        again = set(rerun)
        previous = [i for i in table.column("image_id").to_pylist() if i not in again]
        size = batch if batched_runs is None or runs >= total_runs - batched_runs else older_batch
        for off in range(0, n, size):
            buf = io.BytesIO()
            pq.write_table(table.slice(off, size), buf, compression="zstd")
            output.write_bytes(f"catalog/date={day:%Y-%m-%d}/run_id={run_id}/part-{off:08d}.parquet", buf.getvalue())
            files += 1
        written += n
        runs += 1
        day += timedelta(days=1)
    shape = {"images": written, "files": files, "runs": runs}
    if rerun_rows:
        shape["rerun_rows"] = rerun_rows
    return shape, time.perf_counter() - t0


def _time(fn: Callable[[], object], label: str = "") -> float:
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    if label:
        print(f"  {label}: {took:.3f} s", file=sys.stderr, flush=True)
    return took


PAGE = 100  # rows a person looks at: `imagefab review list` shows this many by default


def time_all(output: OutputStore) -> dict[str, float]:
    import analysis
    from analysis.queries import QUERIES, count_query, export_query
    from app.review import pending_page

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    con = analysis.connect(output)
    out["connect"] = time.perf_counter() - t0
    listing = []  # queries that return a row per image: also timed for their first page
    for name, q in QUERIES.items():
        params = {p.name: value for p in q.params if p.required and (value := PARAMS.get(p.name))}
        took = time.perf_counter()
        _, rows = analysis.run_query(con, name, params)
        out[f"query {name}"] = time.perf_counter() - took
        print(f"  query {name}: {out[f'query {name}']:.3f} s ({len(rows)} rows)", file=sys.stderr, flush=True)
        if len(rows) > PAGE:
            listing.append((name, params))
    for name, params in listing:
        run = partial(analysis.run_query, con, name, params, limit=PAGE)
        out[f"query {name} (first {PAGE} rows)"] = _time(run, f"query {name} (first {PAGE} rows)")
        # What `imagefab query NAME` prints: the first page and the total beside it.
        count = partial(count_query, con, name, params)

        def page_and_total(run: Callable = run, count: Callable = count) -> tuple:
            return run(), count()

        out[f"query {name} (page + total)"] = _time(page_and_total, f"query {name} (page + total)")
        # What `imagefab query NAME --out FILE.parquet` does: every row written by DuckDB.
        with tempfile.TemporaryDirectory() as tmp:
            export = partial(export_query, con, name, f"{tmp}/rows.parquet", params)
            out[f"query {name} (export parquet)"] = _time(export, f"query {name} (export parquet)")
    out["search"] = _time(lambda: analysis.search(con, "red leather boot", limit=20), "search")
    out["search (2nd)"] = _time(lambda: analysis.search(con, "ceramic mug studio", limit=20), "search (2nd)")
    out["report"] = _time(lambda: analysis.build_report(output, max_thumbs=0), "report")
    out["review list"] = _time(lambda: pending_page(output, limit=PAGE), "review list")
    return out


def bench(output: OutputStore, images: int, batch: int, per_run: int, before: bool = True, **writing: object) -> dict:
    from app.catalog.compact import compact

    shape, write_s = write_catalog(output, images, batch, per_run, **writing)  # type: ignore[arg-type]
    print(f"wrote {shape} in {write_s:.1f} s", file=sys.stderr, flush=True)
    result: dict = {**shape, "write_s": round(write_s, 1)}
    if before:
        result["before"] = time_all(output)
    c = compact(output)
    result["compaction"] = {
        "seconds": round(c.seconds, 2),
        "files_in": c.files_in,
        "rows": c.rows,
        "rows_per_s": round(c.rows / c.seconds) if c.seconds else None,
        "files_per_s": round(c.files_in / c.seconds) if c.seconds else None,
        "mb_in": round(c.bytes_in / 2**20, 1),
        "mb_out": round(c.bytes_out / 2**20, 1),
    }
    result["load_after"] = _load()
    result["after"] = time_all(output)
    if not output.is_local:  # the first pass filled the local cache of compacted files
        result["load_warm"] = _load()
        result["after (warm cache)"] = time_all(output)
    return result


def time_uploaded(folder: str) -> dict:
    """Upload an output folder's catalog/ and indexes/ to moto on loopback; time it cold, then warm."""
    import pyarrow.fs as pafs

    if not os.path.isdir(os.path.join(folder, "catalog")):
        raise SystemExit(f"--s3-from {folder}: no catalog/ folder in it")
    with moto_bucket() as (host, port):
        s3 = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http")
        t0 = time.perf_counter()
        for sub in ("catalog", "indexes"):
            if os.path.isdir(os.path.join(folder, sub)):
                pafs.copy_files(
                    os.path.join(os.path.abspath(folder), sub),
                    f"bench/uploaded/{sub}",
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3,
                )
        result: dict = {"where": f"S3 (moto on loopback), {folder} uploaded", "upload_s": time.perf_counter() - t0}
        uri = f"s3://bench/uploaded?endpoint_override={host}:{port}&scheme=http"
        result["load_cold"] = _load()
        result["cold"] = time_all(OutputStore.at(uri))
        result["load_warm"] = _load()
        result["warm"] = time_all(OutputStore.at(uri))
        return result


@contextmanager
def moto_bucket() -> Iterator[tuple[str, int]]:
    """S3 served by moto on loopback with the bucket `bench`, credentials in the environment and an
    empty cache of compacted files (app/catalog/cache.py) unless one is set: (host, port)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    os.environ.setdefault("IMAGEFAB_CATALOG_CACHE", tempfile.mkdtemp(prefix="catalog-scale-cache-"))
    try:
        pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir(
            "bench"
        )
        yield host, port
    finally:
        server.stop()


def _load() -> str:
    """The load average when a pass starts (the machine is shared: figures mean little without it)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        reruns = f", {r['rerun_rows']:,} of them newer rows of an earlier run's images" if r.get("rerun_rows") else ""
        lines.append(
            f"\n{r['where']}: {r['images']:,} images in {r['files']:,} batch files, {r['runs']} runs{reruns} "
            f"(written in {r['write_s']} s); compaction {r['compaction']['seconds']} s "
            f"({r['compaction']['rows_per_s']:,} rows/s, {r['compaction']['files_per_s']:,} files/s, "
            f"{r['compaction']['mb_in']} MB -> {r['compaction']['mb_out']} MB)\n"
        )
        before = r.get("before") or {}
        warm = r.get("after (warm cache)") or {}
        lines.append("| step | before compaction (s) | after (s) |" + (" after, warm cache (s) |" if warm else ""))
        lines.append("|---|---:|---:|" + ("---:|" if warm else ""))
        for k in dict.fromkeys([*before, *r["after"]]):
            b = f"{before[k]:.3f}" if k in before else "-"
            a = f"{r['after'][k]:.3f}" if k in r["after"] else "-"
            w = (f" {warm[k]:.3f} |" if k in warm else " - |") if warm else ""
            lines.append(f"| {k} | {b} | {a} |{w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=4, help="rows per batch file (a run's batch size)")
    p.add_argument("--per-run", type=int, default=10_000, help="images per run (one run a day)")
    p.add_argument("--s3", action="store_true", help="also on an S3 API served by moto on loopback")
    p.add_argument("--local", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--batched-runs",
        type=int,
        help="write only the newest this many runs as --batch-row files, older runs as --older-batch-row files",
    )
    p.add_argument("--older-batch", type=int, default=1000, help="rows per file of the older runs (--batched-runs)")
    p.add_argument("--rerun-share", type=float, default=0.0, help="share of a run re-rendering the run before's images")
    p.add_argument("--before", action=argparse.BooleanOptionalAction, default=True, help="time before compacting")
    p.add_argument("--dir", help="write the local catalog here (kept) instead of a temporary folder")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--s3-from", help="only: upload this output folder to loopback S3 and time it, cold cache then warm")
    args = p.parse_args(argv)
    if args.images < 1 or args.batch < 1 or args.per_run < 1 or args.older_batch < 1:
        p.error("--images, --batch, --older-batch and --per-run must be at least 1")
    if args.batched_runs is not None and args.batched_runs < 0:
        p.error("--batched-runs must be 0 or more")
    if not 0 <= args.rerun_share < 1:
        p.error("--rerun-share must be at least 0 and below 1")
    writing = {"batched_runs": args.batched_runs, "older_batch": args.older_batch, "rerun_share": args.rerun_share}
    results = []
    if args.s3_from:
        results.append(time_uploaded(args.s3_from))
        print(json.dumps(results[0], indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        return 0
    if args.local:
        tmp = args.dir or tempfile.mkdtemp(prefix="catalog-scale-")
        try:
            r = bench(OutputStore.at(tmp), args.images, args.batch, args.per_run, args.before, **writing)
            results.append({"where": "local disk", **r})
        finally:
            if not args.dir:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.s3:
        with moto_bucket() as (host, port):
            out = OutputStore.at(f"s3://bench/catalog-scale?endpoint_override={host}:{port}&scheme=http")
            r = bench(out, args.images, args.batch, args.per_run, args.before, **writing)
            results.append({"where": "S3 (moto on loopback)", **r})
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
