"""Catalog compaction: nothing lost or doubled, crash-safe under kill -9, safe beside writers,
and catalogs written by older releases (the frozen fixture) still read and compact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import analysis
from app.catalog.compact import ROW_GROUP_ROWS, compact, compact_partition, parse_duration
from app.catalog.schema import CATALOG_SCHEMA, CatalogSchemaError, conform
from app.catalog.store import CatalogStore
from app.storage import OutputStore

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "catalog_2026_12"
T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)


def _rows(batch: int, n: int = 4, status: str = "accepted") -> list[dict]:
    return [
        {
            "image_id": f"{batch:04d}{i:02d}" + "0" * 26,
            "status": status,
            "error": "oom: cuda out of memory" if status == "failed" else "",
            "created_at": T0 + timedelta(seconds=batch),
            "prompt": f"red leather boot {batch}",
            "batch_id": f"b{batch}",
        }
        for i in range(n)
    ]


def _write_run(root: Path, batches: int = 6, run_id: str = "r1", date: str = "2026-12-01") -> CatalogStore:
    store = CatalogStore(OutputStore.at(str(root)))
    for b in range(batches):
        store.append(_rows(b, status="failed" if b == 1 else "accepted"), run_id=run_id, date=date)
    return store


def _partition(root: Path, run_id: str = "r1", date: str = "2026-12-01") -> Path:
    return root / "catalog" / f"date={date}" / f"run_id={run_id}"


def _seen(root: Path) -> dict:
    """What every reader sees: imagefab's store, the views, resume's done ids."""
    store = CatalogStore(OutputStore.at(str(root)))
    table = store.read(["image_id"])
    con = analysis.connect(str(root))
    return {
        "rows": table.num_rows,
        "ids": sorted(table.column("image_id").to_pylist()),
        "catalog_view": con.execute("SELECT count(*) FROM catalog").fetchone()[0],
        "images_view": con.execute("SELECT count(*) FROM images").fetchone()[0],
        "done": len(store.done_ids()),
    }


def test_compaction_keeps_every_row_in_one_sorted_file(tmp_path):
    store = _write_run(tmp_path)
    before = _seen(tmp_path)
    assert before["rows"] == before["images_view"] == 24 and before["done"] == 20  # batch 1 failed (oom)
    result = compact(str(tmp_path))
    assert (result.partitions, result.files_in, result.rows) == (1, 6, 24)
    files = sorted(p.name for p in _partition(tmp_path).iterdir())
    assert len(files) == 2 and files[0].startswith("_compaction-") and files[1].startswith("compacted-")
    assert _seen(tmp_path) == before
    meta = pq.ParquetFile(_partition(tmp_path) / files[1])
    assert meta.metadata.num_row_groups == 1 and ROW_GROUP_ROWS >= 24
    ids = meta.read(columns=["image_id"]).column("image_id").to_pylist()
    assert ids == sorted(ids)
    # the run's failed rows still resume; a row is found by id and by batch exactly once
    assert store.find(ids[5])["image_id"] == ids[5]
    assert len(store.batch_rows("b2")) == 4
    # compacting again changes nothing
    assert compact(str(tmp_path)).partitions == 0
    assert _seen(tmp_path) == before


def test_plain_duckdb_and_pyarrow_read_the_compacted_catalog(tmp_path):
    _write_run(tmp_path)
    _write_run(tmp_path, run_id="r2", date="2026-12-02")
    compact(str(tmp_path))
    pattern = f"{tmp_path}/catalog/**/*.parquet"
    ((n, runs),) = duckdb.sql(
        f"SELECT count(*), count(DISTINCT run_id) FROM read_parquet('{pattern}', hive_partitioning = true)"
    ).fetchall()
    assert (n, runs) == (48, 2)
    import pyarrow.dataset as pads

    ds = pads.dataset(f"{tmp_path}/catalog", format="parquet", partitioning="hive")
    assert ds.count_rows() == 48 and len(ds.files) == 2


def test_a_batch_written_during_compaction_is_kept(tmp_path):
    store = _write_run(tmp_path)
    listing = {i.base_name: i for i in store.listing() or []}  # what the compaction listed
    store.append(_rows(99), run_id="r1", date="2026-12-01")  # a writer lands a batch meanwhile
    result = compact_partition(store, str(_partition(tmp_path)), listing)
    assert result.files_in == 6
    seen = _seen(tmp_path)
    assert seen["rows"] == seen["images_view"] == seen["catalog_view"] == 28
    assert compact(str(tmp_path)).files_in == 2  # the next compaction takes it in
    assert _seen(tmp_path) == seen


def test_a_read_during_compactions_sees_every_row_once(tmp_path):
    """Readers list the files, then open them; compactions in another thread delete what they
    merged in between. Every read still sees each row exactly once."""
    import threading

    store = CatalogStore(OutputStore.at(str(tmp_path)))
    store.append(_rows(0), run_id="r1", date="2026-12-01")
    written = [4]
    stop = threading.Event()

    def write_and_compact():
        batch = 1
        while not stop.is_set() and batch < 200:
            store.append(_rows(batch), run_id="r1", date="2026-12-01")
            written.append(written[-1] + 4)
            compact(str(tmp_path), partitions=[("2026-12-01", "r1")])
            batch += 1

    worker = threading.Thread(target=write_and_compact)
    worker.start()
    try:
        for _ in range(60):
            before = written[-1]
            ids = store.read(["image_id"]).column("image_id").to_pylist()
            assert len(ids) == len(set(ids)) and len(ids) >= before
    finally:
        stop.set()
        worker.join()
    assert store.read(["image_id"]).num_rows == written[-1]


CRASH = """
import sys
from app.catalog.compact import compact
compact(sys.argv[1])
"""


@pytest.mark.parametrize("step", ["listed", "written", "committed", "deleting"])
def test_kill_9_at_each_step_loses_nothing_and_the_next_compaction_finishes(tmp_path, step):
    _write_run(tmp_path)
    _write_run(tmp_path, batches=3, run_id="r2")  # a second partition, compacted in the same pass
    before = _seen(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMAGEFAB_COMPACT_CRASH_AFTER": step}
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], env=env, timeout=120)
    assert proc.returncode == -9
    # in the wreck: every row once for imagefab's readers, once per image in the views
    assert _seen(tmp_path) == before
    names = [p.name for p in _partition(tmp_path).iterdir()]
    assert ("_compaction.lock" in names) and (any(n.startswith("compacted-") for n in names) == (step != "listed"))
    result = compact(str(tmp_path))
    assert result.skipped == []  # the dead compaction's lock is not held against the next
    for run_id in ("r1", "r2"):
        left = sorted(p.name for p in _partition(tmp_path, run_id).iterdir())
        assert [n.split("-")[0] for n in left] == ["_compaction", "compacted"], left
    assert _seen(tmp_path) == before


def test_rows_left_twice_are_merged_into_one(tmp_path):
    """Two compactions that both committed (a crash between them) leave rows in two files:
    readers count each image once and the next compaction keeps one row each."""
    store = _write_run(tmp_path)
    part = _partition(tmp_path)
    inputs = sorted(p.name for p in part.iterdir())
    shutil.copy(part / inputs[0], part / "part-copy.parquet")  # the same rows in another batch file
    compact(str(tmp_path))
    assert store.read(["image_id"]).num_rows == 24
    assert _seen(tmp_path)["images_view"] == 24


def test_older_than_leaves_recent_partitions(tmp_path):
    _write_run(tmp_path)
    assert compact(str(tmp_path), older_than_s=3600).partitions == 0
    assert compact(str(tmp_path), older_than_s=0).partitions == 1
    assert parse_duration("7d") == 7 * 86400 and parse_duration("30m") == 1800 and parse_duration("0") == 0
    with pytest.raises(ValueError, match="older-than"):
        parse_duration("yesterday")


def test_catalog_compact_cli(tmp_path, capsys):
    from app.cli import main

    _write_run(tmp_path)
    assert main(["catalog", "compact", "--older-than", "0", "--output", str(tmp_path)]) == 0
    assert "compacted 1 partition(s): 6 files, 24 rows" in capsys.readouterr().out
    assert main(["catalog", "compact", "--older-than", "soon", "--output", str(tmp_path)]) == 2
    assert "--older-than must look like" in capsys.readouterr().err
    assert main(["catalog", "--output", str(tmp_path)]) == 0  # the counts still print


# --- schema evolution: a frozen catalog of today's release, and one older writer --------------


@pytest.fixture()
def frozen(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "out")
    return tmp_path / "out"


def test_frozen_catalog_reads_everywhere(frozen):
    store = CatalogStore(OutputStore.at(str(frozen)))
    table = store.read()
    assert table.num_rows == 9  # 6 of today's rows, 3 from an older writer
    old = table.filter(pa.compute.equal(table.column("run_id"), "older-run"))
    assert old.column("combination").null_count == 3 and old.column("seed").type == pa.int64()
    # usage_rights was text when the fixture was written; where it is declared a struct, the old
    # text lands in the struct's first field
    today = table.filter(pa.compute.equal(table.column("run_id"), "today-run"))
    rights = today.column("usage_rights").to_pylist()
    assert rights == ["internal"] * 6 or [r["licence"] for r in rights] == ["internal"] * 6
    con = analysis.connect(str(frozen))
    outcomes = dict(con.execute("SELECT outcome, count(*) FROM images GROUP BY ALL").fetchall())
    assert outcomes == {"accepted": 3, "review": 3, "rejected": 2, "failed": 1}
    for name in analysis.QUERIES:
        q = analysis.QUERIES[name]
        sample = {"text": "x", "date": "2026-12-01", "month": "2026-12", "number": "1", "integer": "1"}
        params = {p.name: sample[p.kind] for p in q.params if p.required}
        analysis.run_query(con, name, params)  # every named query runs on both generations
    assert analysis.search(con, "red leather boot", columns=("image_id",))[1]


def test_frozen_catalog_compacts_to_todays_schema(frozen):
    store = CatalogStore(OutputStore.at(str(frozen)))
    before = sorted(store.read(["image_id"]).column("image_id").to_pylist())
    result = compact(str(frozen))
    assert result.partitions == 1  # the older run has a single file: nothing to merge
    assert sorted(store.read(["image_id"]).column("image_id").to_pylist()) == before
    compacted = next(_partition(frozen, "today-run").glob("compacted-*.parquet"))
    assert pq.read_schema(compacted).equals(CATALOG_SCHEMA, check_metadata=False)


def test_conform_unifies_text_and_struct_forms_and_names_a_bad_column():
    text = pa.table({"image_id": ["a"], "accelerator": ['{"device": "cuda", "dtype": "fp16"}']})
    out = conform(text)
    assert out.schema.names[: len(CATALOG_SCHEMA)] == CATALOG_SCHEMA.names
    assert out.column("accelerator").to_pylist() == ['{"device": "cuda", "dtype": "fp16"}']
    struct = pa.table({"image_id": ["b"], "accelerator": pa.array([{"device": "cuda", "dtype": "fp16"}])})
    assert conform(struct).column("accelerator").to_pylist() == ['{"device": "cuda", "dtype": "fp16"}']
    newer = pa.table({"image_id": ["c"], "added_later": [1]})
    assert conform(newer).column("added_later").to_pylist() == [1]  # a newer writer's column stays
    with pytest.raises(CatalogSchemaError, match="'steps'"):
        conform(pa.table({"image_id": ["d"], "steps": [[1, 2]]}), "f.parquet")
