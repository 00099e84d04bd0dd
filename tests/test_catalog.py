"""The catalog store: one schema, append-only files, resume look-ups."""

from __future__ import annotations

from datetime import UTC, datetime

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
