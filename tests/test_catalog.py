"""The catalog store: one schema, append-only files, resume look-ups."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from app.catalog.schema import CATALOG_SCHEMA, to_table
from app.catalog.store import CatalogStore
from app.storage import OutputStore, StorageError


def row(image_id, status, error=""):
    return {
        "image_id": image_id,
        "status": status,
        "error": error,
        "source": "bulk",
        "created_at": datetime(2026, 1, 2, tzinfo=UTC),
        "tags": {"sku": "S1"},
        "loras": [{"name": "a", "version": "1", "weight": 0.5, "sha256": "0" * 64, "source": "x"}],
    }


def test_rows_round_trip_through_the_one_schema(tmp_path):
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    uri = store.append([row("a", "accepted"), row("b", "review")], run_id="r1", date="2026-01-02")
    assert uri.startswith(str(tmp_path)) and "date=2026-01-02/run_id=r1/part-" in uri
    t = store.read()
    assert t.schema.names[: len(CATALOG_SCHEMA)] == CATALOG_SCHEMA.names
    got = {r["image_id"]: r for r in t.to_pylist()}
    assert got["a"]["tags"] == [("sku", "S1")] and got["a"]["loras"][0]["weight"] == 0.5
    assert got["a"]["run_id"] == "r1" and got["a"]["approval"] == "pending"
    # DuckDB sees the same rows, partitions included.
    n, run = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), any_value(run_id) FROM read_parquet('{tmp_path}/catalog/**/*.parquet', hive_partitioning=true)"
        )
        .fetchone()
    )
    assert (n, run) == (2, "r1")


def test_done_ids_retry_passing_failures_but_not_bad_rows(tmp_path):
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    assert store.done_ids() == set()
    store.append(
        [
            row("ok", "accepted"),
            row("rej", "rejected"),
            row("bad", "failed", "bad_row: empty prompt"),
            row("oom", "failed", "generate_error: OutOfMemoryError"),
            row("fixed", "failed", "generate_error: x"),
        ],
        run_id="r1",
        date="2026-01-02",
    )
    store.append([row("fixed", "accepted")], run_id="r2", date="2026-01-03")
    assert store.done_ids() == {"ok", "rej", "bad", "fixed"}


def test_unknown_column_values_are_refused_by_the_schema():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table([{"image_id": "a", "steps": "many"}])


def test_unwritable_output_is_a_clear_error():
    # /proc refuses new files even to root (CI runs as root, so chmod alone proves nothing).
    with pytest.raises(StorageError, match="/proc/imagefab-out"):
        OutputStore.at("/proc/imagefab-out").check_writable()


def test_output_location_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        OutputStore.at(str(f)).check_writable()


# A catalog written by an imagefab that recorded `accelerator` only as text (no
# `accelerator_settings` column): two rows, made once with that version's schema.
OLDER_CATALOG = Path(__file__).parent / "data" / "older-catalog"


def test_a_catalog_from_before_accelerator_settings_still_reads_beside_new_rows(tmp_path):
    import analysis
    from app.accelerator import AcceleratorSettings
    from app.regenerate import recorded_compute

    shutil.copytree(OLDER_CATALOG, tmp_path, dirs_exist_ok=True)
    settings = AcceleratorSettings(device="cpu", threads=1, dtype="float32", attention="math")
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    new = {
        **row("aaaa", "accepted"),
        "accelerator": settings.label(),
        "accelerator_settings": settings.to_value(),
        "batch_size": 1,
    }
    store.append([new], run_id="newer-run", date="2026-12-01")
    got = {r["image_id"]: r for r in store.read().to_pylist()}
    assert len(got) == 3
    older = got["0123456789abcdef0123456789abcdef"]
    assert older["accelerator_settings"] is None and older["accelerator"] == "cpu:threads=2+attention=math"
    assert AcceleratorSettings.from_value(got["aaaa"]["accelerator_settings"]) == settings
    # Either form gives the settings `regenerate` renders with.
    old_settings = AcceleratorSettings.from_catalog(older["accelerator_settings"], older["accelerator"])
    assert (old_settings.threads, old_settings.attention) == (2, "math")
    cuda = got["fedcba9876543210fedcba9876543210"]
    compute = recorded_compute(AcceleratorSettings.from_catalog(None, cuda["accelerator"]), cuda["batch_size"])
    assert (compute.device, compute.compile, compute.fp8, compute.batch_size, compute.batch_invariant) == (
        "cuda",
        True,
        True,
        4,
        False,
    )
    assert AcceleratorSettings.from_catalog(got["aaaa"]["accelerator_settings"], "ignored") == settings
    # The analysis views read both files (pyarrow datasets), and so does DuckDB's own reader.
    con = analysis.connect(str(tmp_path))
    assert con.execute("SELECT count(*) FROM images").fetchone() == (3,)
    assert con.execute("SELECT accelerator_settings.attention FROM images WHERE image_id = 'aaaa'").fetchone() == (
        "math",
    )
    n, with_settings = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(accelerator_settings) FROM read_parquet('{tmp_path}/catalog/**/*.parquet', "
            "hive_partitioning = true, union_by_name = true)"
        )
        .fetchone()
    )
    assert (n, with_settings) == (3, 1)


def test_accelerator_settings_in_words_are_the_text_older_catalogs_hold():
    from app.accelerator import ACCELERATOR_SETTINGS_TYPE, AcceleratorSettings

    for text in (
        "cpu:threads=1",
        "cpu:threads=2+attention=math",
        "cuda:NVIDIA H100 80GB HBM3+fused_qkv+channels_last+compiled+fp8+fp8_fp32_accum"
        "+compile_mode=max-autotune+batch_bucket=4+vae_tiling_above=1048576+attention=cudnn",
    ):
        assert AcceleratorSettings.from_label(text).label() == text
    assert ACCELERATOR_SETTINGS_TYPE.names == list(AcceleratorSettings.__dataclass_fields__)
    assert AcceleratorSettings.from_value({"device": "cpu", "threads": 3, "a_later_setting": 1}).threads == 3
