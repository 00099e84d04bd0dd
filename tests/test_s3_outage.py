"""The object store goes away in the middle of a bulk run and comes back, on a local Ray with the
tiny model: S3 on loopback (moto's server) behind a relay the test cuts (tests/moto_s3.py).

- an outage shorter than `output.outage_wait_s`: the job waits and finishes by itself;
- a longer one: the job stops within that wait with one line naming the store (exit 2, no
  traceback), and once the store is back a rerun (the catalog's resume) renders the rest.

Either way every expected image ends up catalogued exactly once, and every catalogued row's image
and variant files exist on the store. The job runs as the CLI runs it, in a subprocess with a Ray
of its own; the store's address reaches it as on a cluster, through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pyarrow.csv as pacsv
import pytest
from moto_s3 import StoreLink, loopback_s3

from app.catalog.store import CatalogStore
from app.spec import load_spec
from app.storage import OutputStore

pytest.importorskip("moto.server")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
BUCKET = "imagefab-outage"
ROWS = 16
SPEC = """\
run_name: outage
input: {path: rows.csv, prompt_template: "studio photo of a {name}", key_column: pid}
tags: [pid]
variations: {seeds_per_row: 1, base_seed: 5}
model: {base: tiny-sdxl}
size: tiny-square
steps: 4
postprocess: {presets: [thumbnail]}
compute: {batch_size: 2}
"""
# `imagefab run`'s entry on a Ray of the job's own (a plain `ray.init()` could join another
# cluster recorded on the machine).
JOB = textwrap.dedent("""
    import sys
    import ray
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False)
    from jobs.generate import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outage-spec")
    (d / "rows.csv").write_text("pid,name\n" + "".join(f"R{i:02d},object number {i}\n" for i in range(ROWS)))
    (d / "job.yaml").write_text(SPEC)
    return d / "job.yaml"


@pytest.fixture(scope="module")
def expected_ids(spec_path, model_catalog) -> set[str]:
    """The job's image ids, expanded here as the job's first stage does."""
    from app.expand import ExpandRows
    from app.plan import csv_string_types, resolve_models
    from app.request import requests_from_column

    spec = load_spec(spec_path)
    models = resolve_models(spec, model_catalog)
    table = pacsv.read_csv(spec.input.path, convert_options=csv_string_types(["pid", "name"]))
    ids = {r.image_id for r in requests_from_column(ExpandRows(spec, models)(table)["request"])}
    assert len(ids) == ROWS
    return ids


@pytest.fixture()
def store():
    """The S3 server (the test reaches it directly) and a relay to it that the job uses."""
    with loopback_s3(BUCKET) as address:
        link = StoreLink(address)
        yield link
        link.cut()


def start_job(spec_path: Path, link: StoreLink, output: str, wait_s: float, log: Path) -> subprocess.Popen:
    argv = [spec_path, "--output", output, "--set", f"output.outage_wait_s={wait_s}", "--no-mlflow", "--quiet"]
    return subprocess.Popen(
        [sys.executable, "-c", JOB, *map(str, argv), "--json"],
        cwd=REPO,
        env={**os.environ, "AWS_ENDPOINT_URL": f"http://{link.address}"},
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def cut_after_first_batch(
    job: subprocess.Popen, link: StoreLink, output: str, log: Path, timeout_s: float = 300
) -> int:
    """Cut the link once the first batch is catalogued; returns how many images were by then."""
    catalog = CatalogStore(OutputStore.at(output))  # the test's own view: straight to the server
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if job.poll() is not None:
            pytest.fail(f"the job ended before the outage (exit {job.returncode}): {log.read_text()[-3000:]}")
        if catalog.listing():
            break
        time.sleep(0.1)
    else:
        pytest.fail("no batch catalogued in time")
    link.cut()
    assert link.refuses()
    return len(catalog.read(["image_id"]))


def check_catalog(output: str, expected: set[str]) -> list[dict]:
    """Every expected image catalogued exactly once, nothing else, every file there."""
    out = OutputStore.at(output)
    rows = CatalogStore(out).read(["image_id", "status", "uri", "variants", "run_id"]).to_pylist()
    counts = Counter(r["image_id"] for r in rows)
    assert set(counts) == expected, f"missing {expected - set(counts)}, unexpected {set(counts) - expected}"
    assert [i for i, n in counts.items() if n > 1] == []
    for r in rows:
        assert r["status"] != "failed", r
        for uri in [r["uri"], *(v["uri"] for v in r["variants"])]:
            assert out.read_bytes(out.rel_of(uri)), uri  # raises StorageError when missing
    return rows


def test_a_short_outage_pauses_the_job_and_it_finishes(store, spec_path, expected_ids, tmp_path):
    output = f"s3://{BUCKET}/short"
    job = start_job(spec_path, store, output, wait_s=120, log=tmp_path / "job.log")
    before = cut_after_first_batch(job, store, output, tmp_path / "job.log")
    t_cut = time.monotonic()
    time.sleep(15)  # longer than the S3 client's own retries (about 6 s)
    assert job.poll() is None, f"the job stopped during the outage: {(tmp_path / 'job.log').read_text()[-3000:]}"
    store.restore()
    stdout, _ = job.communicate(timeout=300)
    log = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, log[-3000:]
    assert before < ROWS, "the outage came after the last batch: it tested nothing"
    assert time.monotonic() - t_cut >= 15
    summary = json.loads(stdout)
    assert summary["rendered"] == ROWS and summary["counts"]["failed"] == 0
    assert {r["run_id"] for r in check_catalog(output, expected_ids)} == {summary["run_id"]}


def test_a_long_outage_stops_the_job_naming_the_store_and_a_rerun_completes(store, spec_path, expected_ids, tmp_path):
    output = f"s3://{BUCKET}/long"
    job = start_job(spec_path, store, output, wait_s=5, log=tmp_path / "first.log")
    before = cut_after_first_batch(job, store, output, tmp_path / "first.log")
    t_cut = time.monotonic()
    stdout, _ = job.communicate(timeout=180)  # a hang fails here
    stopped_after = time.monotonic() - t_cut
    log = (tmp_path / "first.log").read_text()
    assert job.returncode == 2, log[-3000:]
    assert before < ROWS
    assert stopped_after < 120, stopped_after
    error = json.loads(stdout)["error"]
    assert error.startswith(f"{output}/") and "the object store did not answer for over 5 s" in error, error
    assert "\n" not in error
    assert f"imagefab: error: {error}" in log and "Traceback" not in log, log[-3000:]

    store.restore()
    job = start_job(spec_path, store, output, wait_s=60, log=tmp_path / "rerun.log")
    stdout, _ = job.communicate(timeout=300)
    assert job.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    rerun = json.loads(stdout)
    rows = check_catalog(output, expected_ids)
    first_run = {r["image_id"] for r in rows if r["run_id"] != rerun["run_id"]}
    assert len(first_run) >= before  # what the first run catalogued stayed, and was not rendered again
    assert rerun["skipped_existing"] == len(first_run) and rerun["rendered"] == ROWS - len(first_run)
