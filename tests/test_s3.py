"""Outputs and the catalog on S3: a real S3 API over HTTP on loopback (moto's server), reached
through pyarrow's S3 filesystem exactly as an AWS bucket or MinIO would be.

Settings reach the store the way they reach it on a cluster: `AWS_ENDPOINT_URL` and the
credentials from the environment of every process (driver and Ray workers), or non-secret
options in the URI's query (app/storage.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
import pytest
from moto_s3 import StoreLink, loopback_s3
from PIL import Image

from app.catalog.store import CatalogStore
from app.storage import OutputStore, StorageError

pytest.importorskip("moto.server")  # before the fixtures, so the whole module skips without moto

REPO = Path(__file__).resolve().parents[1]
BUCKET = "imagefab-test"


@pytest.fixture(scope="module")
def s3():
    """A loopback S3 server, one bucket, and the AWS_* variables pointing at it; yields host:port."""
    with loopback_s3(BUCKET) as address:
        yield address


def row(image_id, status, error=""):
    return {
        "image_id": image_id,
        "status": status,
        "error": error,
        "source": "bulk",
        "created_at": datetime(2026, 1, 2, tzinfo=UTC),
        "tags": {"sku": "S1"},
    }


def test_output_store_writes_reads_and_names_s3_locations(s3):
    store = OutputStore.at(f"s3://{BUCKET}/store")
    store.check_writable()
    uri = store.write_bytes("images/ab/abc.png", b"png bytes")
    assert uri == f"s3://{BUCKET}/store/images/ab/abc.png"
    assert store.read_bytes(store.rel_of(uri)) == b"png bytes"
    # Workers receive the store pickled and open their own filesystem from the environment.
    again = pickle.loads(pickle.dumps(store))
    assert again.read_bytes("images/ab/abc.png") == b"png bytes"
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/store/images/missing.png"):
        store.read_bytes("images/missing.png")


def test_a_missing_bucket_stops_the_job_before_any_work(s3):
    with pytest.raises(StorageError, match="s3://no-such-bucket/out"):
        OutputStore.at("s3://no-such-bucket/out").check_writable()


def test_readers_never_see_half_an_object(s3):
    """A 24 MB upload (a multipart upload in pyarrow) is invisible until it completes."""
    store = OutputStore.at(f"s3://{BUCKET}/atomic")
    fs, _ = store.fs_and_root
    data = os.urandom(24 * 2**20)
    writer = threading.Thread(target=store.write_bytes, args=("big.bin", data))
    seen = set()
    writer.start()
    while writer.is_alive():
        info = fs.get_file_info(store.path("big.bin"))
        seen.add(info.size if info.type == pafs.FileType.File else None)
    writer.join()
    assert None in seen and seen <= {None, len(data)}  # looked while it uploaded; never a partial size
    assert store.read_bytes("big.bin") == data


def test_an_outage_shorter_than_the_wait_is_waited_out_and_a_longer_one_names_the_store(s3, monkeypatch):
    """The store behind a relay that is cut and restored (tests/moto_s3.py); the job's wait is
    `output.outage_wait_s`, a store opened without one fails after the S3 client's own retries."""
    link = StoreLink(s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{link.address}")
    store = OutputStore.at(f"s3://{BUCKET}/outage", outage_wait_s=30)
    store.write_bytes("before.txt", b"1")
    link.cut()
    threading.Timer(3.0, link.restore).start()
    t0 = time.monotonic()
    assert store.write_bytes("during.txt", b"2") == f"s3://{BUCKET}/outage/during.txt"
    assert time.monotonic() - t0 >= 3.0
    assert store.read_bytes("before.txt") == b"1" and store.read_bytes("during.txt") == b"2"

    link.cut()
    try:
        brief = OutputStore.at(f"s3://{BUCKET}/outage", outage_wait_s=1)
        with pytest.raises(
            StorageError, match=rf"^s3://{BUCKET}/outage/after.txt: the object store did not answer for over 1 s"
        ):
            brief.write_bytes("after.txt", b"3")
        with pytest.raises(StorageError, match=rf"^s3://{BUCKET}/outage/before.txt: cannot read .*NETWORK_CONNECTION"):
            OutputStore.at(f"s3://{BUCKET}/outage").read_bytes("before.txt")  # no wait: the client's retries only
    finally:
        link.restore()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/a.txt: cannot write"):
        OutputStore.at("s3://no-such-bucket/x", outage_wait_s=30).write_bytes("a.txt", b"4")
    assert time.monotonic() - t0 < 10  # an error waiting cannot cure is not waited on


def test_endpoint_in_the_uri_query_stays_out_of_every_location(s3, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the query knows where the server is
    store = OutputStore.at(f"s3://{BUCKET}/query?endpoint_override={s3}&scheme=http")
    assert store.uri == f"s3://{BUCKET}/query" and store.fs_options == f"endpoint_override={s3}&scheme=http"
    uri = store.write_bytes("runs/r1/run.json", b"{}")
    assert uri == f"s3://{BUCKET}/query/runs/r1/run.json"
    assert pickle.loads(pickle.dumps(store)).read_bytes(store.rel_of(uri)) == b"{}"


def test_catalog_append_read_and_resume_on_s3(s3):
    store = CatalogStore(OutputStore.at(f"s3://{BUCKET}/catalog-test"))
    assert store.done_ids() == set() and store.read().num_rows == 0
    uri = store.append(
        [
            row("ok", "accepted"),
            row("oom", "failed", "generate_error: OutOfMemoryError"),
            row("bad", "failed", "bad_row: empty prompt"),
        ],
        run_id="r1",
        date="2026-01-02",
    )
    assert uri.startswith(f"s3://{BUCKET}/catalog-test/catalog/date=2026-01-02/run_id=r1/part-")
    store.append([row("oom", "accepted")], run_id="r2", date="2026-01-03")
    assert store.done_ids() == {"ok", "bad", "oom"}
    assert store.find("ok")["run_id"] == "r1" and store.find("oom")["run_id"] == "r2"
    con = duckdb.connect()
    got = con.from_arrow(store.dataset()).aggregate("run_id, count(*) AS n", "run_id").order("run_id").fetchall()
    assert got == [("r1", 3), ("r2", 1)]


JOB = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    from app.spec import load_spec
    from jobs.generate import run
    spec = load_spec("specs/ecommerce.yaml", {"output.uri": sys.argv[1], "input.limit": 1,
                                              "postprocess.presets": ["thumbnail"]})
    for attempt in ("first", "rerun"):
        s = run(spec, quiet=True)
        print("RESULT " + json.dumps({"attempt": attempt, "run_id": s.run_id, "output": s.output,
                                      "rendered": s.rendered, "skipped": s.skipped_existing, "counts": s.counts}))
""")


@pytest.mark.slow
@pytest.mark.ray
def test_bulk_job_writes_to_s3_and_duckdb_reads_the_catalog_back(s3):
    """`run(spec)` with an s3:// output on a local Ray whose workers get the AWS_* settings from
    their environment; a rerun finds the catalog on S3 and renders nothing."""
    output = f"s3://{BUCKET}/shop"
    res = subprocess.run(
        [sys.executable, "-c", JOB, output], cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    first, rerun = (
        json.loads(line.removeprefix("RESULT ")) for line in res.stdout.splitlines() if line.startswith("RESULT ")
    )
    assert first["output"] == output and first["rendered"] == 2 and first["counts"]["failed"] == 0
    assert rerun["rendered"] == 0 and rerun["skipped"] == 2  # resume read the catalog from S3

    store = OutputStore.at(output)
    catalog = CatalogStore(store)
    rows = catalog.read().to_pylist()
    assert len(rows) == 2 and {r["run_id"] for r in rows} == {first["run_id"]}
    for r in rows:
        assert r["uri"].startswith(f"{output}/images/")
        master = Image.open(io.BytesIO(store.read_bytes(store.rel_of(r["uri"]))))
        assert master.size == (r["width"], r["height"]) and master.format == "PNG"
        for v in r["variants"]:
            assert (
                v["uri"].startswith(f"{output}/images/") and len(store.read_bytes(store.rel_of(v["uri"]))) == v["bytes"]
            )
    summary = json.loads(store.read_bytes(f"runs/{first['run_id']}/summary.json"))
    assert summary["rendered"] == 2

    # DuckDB over the same objects: no httpfs, a pyarrow dataset on the S3 filesystem.
    con = duckdb.connect()
    con.register("catalog", catalog.dataset())
    got = con.execute(
        "SELECT count(*), count(DISTINCT image_id), min(uri LIKE 's3://%'), any_value(run_id) "
        "FROM catalog WHERE status <> 'failed'"
    ).fetchone()
    assert got == (2, 2, True, first["run_id"])
