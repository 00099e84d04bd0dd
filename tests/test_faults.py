"""Faults during a bulk run, on a local Ray with the tiny models: nothing lost, nothing half-written.

- a generator actor SIGKILLed mid-run: Ray restarts it and retries its batch (jobs/generate.py,
  ACTOR_RETRIES); the run completes with every request once in the catalog;
- the driver SIGKILLed mid-run, then the same spec rerun into the same output: it renders only the
  missing ids;
- a row that breaks post-processing (a prompt too long for a JPEG's EXIF): that row fails with the
  reason, the others pass;
- an output that fills up (a small tmpfs): one clear error, every visible file complete, and a
  rerun once there is space finishes the job.

Every image's pixel sha256 is compared with a clean render of the same request (`reference`).
The killed runs need a Ray of their own, so they run in a subprocess (as test_gpu_scheduling does).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from app.catalog.store import CatalogStore
from app.spec import load_spec
from app.storage import OutputStore

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROWS = 12  # rows 0..11 render; row 12's prompt is too long for a JPEG variant's EXIF
LONG_NAME = "velvet " * 6000  # 42k characters: 84 KB of UTF-16 infotext, a JPEG segment holds 64 KB
SPEC = """\
run_name: faults
input: {path: rows.csv, prompt_template: "studio photo of a {name}", key_column: pid}
tags: [pid]
variations: {seeds_per_row: 1, base_seed: 9}
model: {base: tiny-sdxl, loras: [{name: tiny-style, weight: 0.6}]}
size: tiny-square
steps: 6
postprocess: {presets: [thumbnail], format: jpeg}
compute: {batch_size: 2}
"""
JOB = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    from app.spec import load_spec
    from jobs.generate import run
    spec = load_spec(sys.argv[1], {"output.uri": sys.argv[2], **json.loads(sys.argv[4])})
    s = run(spec, run_id=sys.argv[3], quiet=True)
    print("RESULT " + json.dumps(s.to_dict()), flush=True)
""")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults-spec")
    lines = ["pid,name"] + [f"R{i:02d},object number {i}" for i in range(ROWS)] + [f"R{ROWS},{LONG_NAME}"]
    (d / "rows.csv").write_text("\n".join(lines) + "\n")
    (d / "job.yaml").write_text(SPEC)
    return d / "job.yaml"


def _requests(spec_path: Path) -> list:
    """The job's render requests, expanded here as the job's first stage does."""
    from app.expand import ExpandRows
    from app.models.catalog import ModelCatalog
    from app.plan import csv_string_types, resolve_models
    from app.request import requests_from_column

    spec = load_spec(spec_path)
    models = resolve_models(spec, ModelCatalog.load())
    table = pacsv.read_csv(spec.input.path, convert_options=csv_string_types(["pid", "name"]))
    return requests_from_column(ExpandRows(spec, models)(table)["request"])


@pytest.fixture(scope="module")
def reference(spec_path, model_catalog) -> dict[str, str]:
    """image_id -> pixel sha256 of a clean render: the job's requests rendered in this process."""
    from app.generator import Generator
    from app.plan import resolve_models

    spec = load_spec(spec_path)
    models = resolve_models(spec, model_catalog)
    requests = _requests(spec_path)
    generator = Generator(models.bases["tiny-sdxl"], models.loras, spec.compute)
    return {r.image_id: hashlib.sha256(r.pixels.tobytes()).hexdigest() for r in generator.render(requests)}


@pytest.fixture(scope="module")
def first_rows(spec_path) -> set[str]:
    """The ids of rows 0..11: a job with `input.limit: 12`, without the long-prompt row."""
    return {r.image_id for r in _requests(spec_path) if r.row_key != f"R{ROWS}"}


def catalog(out: Path) -> list[dict]:
    return CatalogStore(OutputStore.at(str(out))).read().to_pylist()


def parts(out: Path) -> list[str]:
    return glob.glob(f"{out}/catalog/*/*/part-*.parquet")


def start_job(spec_path: Path, out: Path, run_id: str, log: Path, **overrides) -> subprocess.Popen:
    # A session of its own: the job's Ray processes are its descendants, and killpg ends them all.
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(spec_path), str(out), run_id, json.dumps(overrides)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def end_job(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def wait_for_parts(out: Path, n: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(parts(out)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"no {n} catalog files before the job ended or {timeout} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.1)


def descendants(proc: subprocess.Popen, title: str) -> list[int]:
    """Pids of the job's own processes whose command line holds `title` (Ray names actor processes
    `ray::MapWorker(MapBatches(Generator))`); other Ray instances on the machine are not looked at."""
    import psutil

    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return found


def job_result(log: Path) -> dict:
    line = next(line for line in log.read_text().splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def assert_complete_files(out: Path) -> None:
    """Every file a reader can see is whole: Parquet files read, images decode to the last byte."""
    for path in parts(out):
        pq.read_table(path)
    for path in glob.glob(f"{out}/images/**/*.*", recursive=True):
        with Image.open(path) as im:
            im.load()


def assert_every_request_once_as_rendered(out: Path, reference: dict[str, str], ids: set[str]) -> list[dict]:
    rows = catalog(out)
    seen = [r["image_id"] for r in rows]
    assert len(seen) == len(set(seen)), "an image_id is catalogued twice"
    assert set(seen) == ids
    for r in rows:
        if r["status"] != "failed":
            assert r["pixel_sha256"] == reference[r["image_id"]], r["image_id"]
            assert Path(r["uri"]).is_file()
    return rows


@pytest.fixture(scope="module")
def killed_generator_run(spec_path, tmp_path_factory) -> tuple[dict, Path]:
    """The whole input (the long-prompt row too), its generator SIGKILLed once the first batch is
    catalogued; returns the job's summary and its output."""
    d = tmp_path_factory.mktemp("killed-generator")
    out, log = d / "out", d / "job.log"
    proc = start_job(spec_path, out, "killed-generator", log)
    try:
        wait_for_parts(out, 1, proc, log)
        workers = descendants(proc, "MapBatches(Generator)")
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        end_job(proc)
    return job_result(log), out


def test_killed_generator_actor_is_restarted_and_its_batch_retried(killed_generator_run, reference):
    result, out = killed_generator_run
    # Two generator instances rendered: the one killed and the one Ray restarted.
    assert len(result["by_generator"]) == 2, result["by_generator"]
    assert result["rendered"] == ROWS + 1
    assert_every_request_once_as_rendered(out, reference, set(reference))
    assert_complete_files(out)


def test_a_row_that_breaks_postprocessing_fails_alone(killed_generator_run):
    """A real trigger: a 42k-character prompt does not fit a JPEG variant's EXIF segment."""
    result, out = killed_generator_run
    rows = catalog(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [dict(r["tags"])["pid"] for r in failed] == [f"R{ROWS}"] and result["counts"]["failed"] == 1
    assert failed[0]["error"].startswith("postprocess_error: ValueError: the infotext of image")
    assert "more than a JPEG segment holds" in failed[0]["error"] and not failed[0]["uri"]
    assert all(r["uri"] and r["pixel_sha256"] for r in rows if r["status"] != "failed")


def test_killed_driver_then_rerun_renders_only_what_is_missing(spec_path, reference, first_rows, ray_local, tmp_path):
    from jobs.generate import run

    out, log = tmp_path / "out", tmp_path / "job.log"
    proc = start_job(spec_path, out, "killed-driver", log, **{"input.limit": ROWS})
    try:
        wait_for_parts(out, 2, proc, log)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone; its Ray processes share its fate
        proc.wait(30)
        time.sleep(2)
    finally:
        end_job(proc)  # whatever is left of that Ray
    before = {r["image_id"] for r in catalog(out)}
    assert 2 <= len(before) < ROWS

    spec = load_spec(spec_path, {"output.uri": str(out), "input.limit": ROWS})
    resumed = run(spec, run_id="resumed", quiet=True)
    assert resumed.skipped_existing == len(before)
    assert resumed.rendered == ROWS - len(before) and resumed.counts["failed"] == 0
    rows = assert_every_request_once_as_rendered(out, reference, first_rows)
    assert {r["run_id"] for r in rows if r["image_id"] in before} == {"killed-driver"}
    assert_complete_files(out)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 600 KB filesystem (room for run.json and a few images); skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); needs root")
    yield where
    # Ray's workers from the in-process rerun may still hold a file there for a moment after the run
    # returns ("target is busy"): retry, then detach lazily so the kernel frees it once they let go.
    for _ in range(10):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    subprocess.run(["umount", "-l", str(where)], check=True)


def test_full_output_stops_with_a_clear_error_and_a_rerun_finishes(
    spec_path, reference, first_rows, ray_local, small_tmpfs
):
    from jobs.generate import run

    # The CLI, with a Ray of its own, as an operator runs it.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.generate",
            str(spec_path),
            "--output",
            str(small_tmpfs),
            "--quiet",
            "--no-mlflow",
            "--set",
            f"input.limit={ROWS}",
            "--run-id",
            "full",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    [error] = [line for line in res.stderr.splitlines() if line.startswith("imagefab: error:")]
    assert error.startswith(f"imagefab: error: {small_tmpfs}/") and error.endswith(
        "cannot write (No space left on device)"
    )
    # Nothing half-written: no temporary file left, every visible file whole, every catalogued image there.
    assert not glob.glob(f"{small_tmpfs}/**/.*", recursive=True)
    assert_complete_files(small_tmpfs)
    before = catalog(small_tmpfs)
    assert len(before) < ROWS and all(r["status"] != "failed" and Path(r["uri"]).is_file() for r in before)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # space again
    spec = load_spec(spec_path, {"output.uri": str(small_tmpfs), "input.limit": ROWS})
    rerun = run(spec, run_id="after-full", quiet=True)
    assert rerun.skipped_existing == len(before) and rerun.counts["failed"] == 0
    assert_every_request_once_as_rendered(small_tmpfs, reference, first_rows)
