"""The whole bulk job on a local Ray with the tiny models: rows, LoRA weights, bad rows, resume,
determinism across runs, regenerate, and failing fast on bad models."""

from __future__ import annotations

import io
import shutil
import textwrap

import duckdb
import numpy as np
import pytest
from PIL import Image

from app.catalog.store import CatalogStore
from app.metadata import read_metadata
from app.models.digest import ModelFileError
from app.spec import SpecError, load_spec
from app.storage import OutputStore

pytestmark = pytest.mark.ray

ROWS = """\
pid,name,color,loras,width
P1,leather boot,tan,tiny-style:0.4,
P2,canvas tote,navy,tiny-style:0.9,
P3,coffee mug,white,,
P4,broken size,red,,1001
P5,,green,,
P6,ghost style,grey,tiny-ghost:0.5,
"""
GOOD_REQUESTS = 3 * 2  # P1..P3, two seeds each
BAD_REQUESTS = 3 * 2


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    (d / "rows.csv").write_text(ROWS)
    (d / "job.yaml").write_text(
        textwrap.dedent("""\
        run_name: test-job
        input: {path: rows.csv, prompt_template: "studio photo of a {name}, {color}", key_column: pid}
        tags: [pid]
        variations: {seeds_per_row: 2, base_seed: 1}
        model: {base: tiny-sdxl, loras: [{name: tiny-detail, weight: 0.7}]}
        size: tiny-portrait
        steps: 3
        postprocess: {presets: [thumbnail], format: jpeg}
        compute: {batch_size: 2}
    """)
    )
    return d / "job.yaml"


def run_job(spec_path, output, **overrides):
    from jobs.generate import run

    spec = load_spec(spec_path, {"output.uri": str(output), **overrides})
    return run(spec, quiet=True)


@pytest.fixture(scope="module")
def runs(ray_local, spec_path, tmp_path_factory):
    """A partial run then a resumed full run into A, and one full run into B."""
    out_a, out_b = tmp_path_factory.mktemp("out_a"), tmp_path_factory.mktemp("out_b")
    partial = run_job(spec_path, out_a, **{"input.limit": 1})
    resumed = run_job(spec_path, out_a)
    fresh = run_job(spec_path, out_b)
    return {"partial": partial, "resumed": resumed, "fresh": fresh, "a": out_a, "b": out_b}


def catalog(out):
    return CatalogStore(OutputStore.at(str(out))).read().to_pylist()


def test_partial_then_resumed_run_covers_every_row_exactly_once(runs):
    assert runs["partial"].counts["failed"] == 0 and runs["partial"].rendered == 2
    resumed = runs["resumed"]
    assert resumed.skipped_existing == 2
    assert resumed.requests == GOOD_REQUESTS + BAD_REQUESTS
    assert resumed.rendered == GOOD_REQUESTS - 2
    rows = catalog(runs["a"])
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == GOOD_REQUESTS + BAD_REQUESTS
    assert {r["run_id"] for r in rows} == {runs["partial"].run_id, resumed.run_id}


def test_a_budget_stops_the_run_after_one_batch_and_a_rerun_renders_the_rest(ray_local, spec_path, tmp_path):
    # Nothing is known of the cost before the first batch: it runs alone, and its device time
    # already crosses the cap, so no second batch starts.
    capped = run_job(spec_path, tmp_path, **{"input.limit": 2, "budget.max_device_seconds": 0.001})
    assert capped.stopped_on_budget and capped.budget["admitted_images"] == 2
    assert capped.counts["failed"] == 2 and capped.budget["refused_images"] == 2
    stopped = [r for r in catalog(tmp_path) if r["status"] == "failed"]
    assert all(r["error"].startswith("budget_exhausted: the run stopped on budget (device cap") for r in stopped)
    assert "STOPPED on budget" in capped.render()
    rest = run_job(spec_path, tmp_path, **{"input.limit": 2})  # no cap: the refused images render now
    assert rest.rendered == 2 and rest.counts["failed"] == 0 and not rest.stopped_on_budget
    rendered = {r["image_id"] for r in catalog(tmp_path) if r["status"] != "failed"}
    assert len(rendered) == 4


def test_bad_rows_become_failed_catalog_rows_with_reasons(runs):
    rows = catalog(runs["a"])
    failed = {r["tags"] and dict(r["tags"])["pid"]: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"P4", "P5", "P6"}
    assert "divisible by 8 but are 1001" in failed["P4"]
    assert "template column 'name' is empty" in failed["P5"]
    assert "unknown LoRA 'tiny-ghost'" in failed["P6"]
    good = [r for r in rows if r["status"] != "failed"]
    assert len(good) == GOOD_REQUESTS and all(r["uri"] and r["pixel_sha256"] for r in good)


def test_row_lora_weights_are_recorded_with_lineage(runs):
    rows = {dict(r["tags"])["pid"]: r for r in catalog(runs["a"]) if r["status"] != "failed"}
    assert [(lo["name"], lo["weight"]) for lo in rows["P1"]["loras"]] == [("tiny-style", 0.4)]
    assert [(lo["name"], lo["weight"]) for lo in rows["P2"]["loras"]] == [("tiny-style", 0.9)]
    assert [(lo["name"], lo["weight"]) for lo in rows["P3"]["loras"]] == [("tiny-detail", 0.7)]
    assert all(len(lo["sha256"]) == 64 for r in rows.values() for lo in r["loras"])
    assert rows["P1"]["width"] == 192 and rows["P1"]["height"] == 256


def test_same_spec_twice_gives_identical_pixels_and_metadata(runs):
    """The files differ only in their C2PA manifests: each signature is made anew (its own time
    and nonce); the pixels (watermark included) and every other metadata field are the same."""
    a = {r["image_id"]: r for r in catalog(runs["a"]) if r["status"] != "failed"}
    b = {r["image_id"]: r for r in catalog(runs["b"]) if r["status"] != "failed"}
    assert a.keys() == b.keys() and a
    store_a, store_b = OutputStore.at(str(runs["a"])), OutputStore.at(str(runs["b"]))
    for image_id in a:
        assert a[image_id]["pixel_sha256"] == b[image_id]["pixel_sha256"]
        file_a = store_a.read_bytes(store_a.rel_of(a[image_id]["uri"]))
        file_b = store_b.read_bytes(store_b.rel_of(b[image_id]["uri"]))
        with Image.open(io.BytesIO(file_a)) as image_a, Image.open(io.BytesIO(file_b)) as image_b:
            assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
        assert read_metadata(file_a) == read_metadata(file_b)


def test_summary_counts_match_the_catalog_and_duckdb_reads_it(runs):
    fresh = runs["fresh"]
    c = fresh.counts
    assert sum(c.values()) == GOOD_REQUESTS + BAD_REQUESTS and c["failed"] == BAD_REQUESTS
    assert fresh.gpu_seconds > 0 and fresh.images_per_second > 0
    con = duckdb.connect()
    n, statuses = con.execute(
        f"SELECT count(*), list(DISTINCT status) FROM read_parquet('{runs['b']}/catalog/**/*.parquet', hive_partitioning=true)"
    ).fetchone()
    assert n == GOOD_REQUESTS + BAD_REQUESTS and "failed" in statuses
    assert OutputStore.at(str(runs["b"])).read_bytes(f"runs/{fresh.run_id}/summary.json")


def test_regenerate_reproduces_a_catalogued_image(runs):
    from app.regenerate import regenerate

    row = next(r for r in catalog(runs["b"]) if r["status"] != "failed" and r["loras"])
    report = regenerate(row["image_id"], str(runs["b"]))
    assert report.identical and report.max_abs_diff == 0


def test_the_catalog_records_typed_requests_and_accelerator_settings(runs):
    rows = [r for r in catalog(runs["b"]) if r["status"] != "failed"]
    assert rows and all(r["accelerator_settings"]["device"] == "cpu" for r in rows)
    assert {r["accelerator_settings"]["threads"] for r in rows} == {1}
    assert all(r["accelerator"] == "cpu:threads=1" for r in rows)
    # Lists and maps arrive whole through the Ray stages: tags, template, the LoRA stack.
    boot = next(r for r in rows if dict(r["tags"])["pid"] == "P1")
    assert [(lo["name"], lo["weight"]) for lo in boot["loras"]] == [("tiny-style", 0.4)]
    assert boot["template"]["text"] == "studio photo of a {name}, {color}"
    assert dict(boot["variables"]) == {"name": "leather boot", "color": "tan"}


def test_regenerate_reads_a_catalog_written_before_accelerator_settings(runs, tmp_path):
    """An older imagefab wrote the same rows without the `accelerator_settings` column."""
    import pyarrow.parquet as pq

    from app.regenerate import regenerate

    out = tmp_path / "older"
    shutil.copytree(runs["b"], out)
    for part in (out / "catalog").rglob("*.parquet"):
        pq.write_table(pq.read_table(part, partitioning=None).drop_columns(["accelerator_settings"]), part)
    row = next(r for r in catalog(out) if r["status"] != "failed" and r["loras"])
    assert row["accelerator_settings"] is None and row["accelerator"] == "cpu:threads=1"
    report = regenerate(row["image_id"], str(out))
    assert report.identical  # the pixels' sha256 (the copy's `uri`s still name the first folder)


def test_corrupt_model_fails_before_any_work(ray_local, spec_path, tmp_path, tiny_base):

    copy = tmp_path / "base"
    shutil.copytree(tiny_base.path, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    (tmp_path / "catalog.yaml").write_text(
        f"base_models:\n  my-base:\n    source: {copy}\n    sha256: {tiny_base.sha256}\n"
    )
    out = tmp_path / "out"
    with pytest.raises(ModelFileError) as e:
        run_job(
            spec_path,
            out,
            **{"model.base": "my-base", "model.catalog": str(tmp_path / "catalog.yaml"), "model.loras": []},
        )
    assert str(weights) in str(e.value) and "sha256 mismatch" in str(e.value)
    assert not (out / "catalog").exists()


def test_template_column_missing_from_input_fails_fast(ray_local, spec_path, tmp_path):
    with pytest.raises(SpecError, match="input.prompt_template: column 'material' is not in"):
        run_job(spec_path, tmp_path / "out", **{"input.prompt_template": "{name} in {material}"})
    assert not (tmp_path / "out" / "catalog").exists()


def test_unwritable_output_fails_before_any_work(ray_local, spec_path):
    from app.storage import StorageError

    with pytest.raises(StorageError, match="/proc/imagefab-out"):
        run_job(spec_path, "/proc/imagefab-out")


def test_the_summary_counts_input_rows_however_many_requests_each_gives(ray_local, spec_path):
    from app.models.catalog import ModelCatalog
    from app.plan import input_columns, resolve_models, row_lora_names
    from jobs.generate import expand_requests

    spec = load_spec(
        spec_path,
        {
            "input.prompt_template": "studio photo of a {name}, {color}, {scene}",
            "input.matrix": {"scene": ["on a counter", "on a beach", "in a café"]},
        },
    )
    columns = input_columns(spec)
    models = resolve_models(spec, ModelCatalog.load(None), row_lora_names(spec, columns))

    table, input_rows = expand_requests(spec, models, columns)

    assert input_rows == 6 and table.num_rows == 6 * 3 * 2  # rows x scenes x seeds
