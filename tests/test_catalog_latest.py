"""The latest row per image without ranking the whole catalog: compaction checks each partition's
ids against the rest of the catalog, and the views, the search index and the review queue take a
checked row as its image's latest unless its id is contested. Every result here is compared with
the plain rule (rank all rows of an image by created_at, then run_id) computed independently."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

import analysis
from app.catalog.compact import compact
from app.catalog.store import CONTESTED_PREFIX, UNIQUE_PREFIX, CatalogStore
from app.review import decide, pending_page
from app.storage import OutputStore

T0 = datetime(2026, 12, 1, 9, tzinfo=UTC)
STATUSES = ("accepted", "review", "review", "rejected", "failed")


def _row(i: int, when: datetime, status: str | None = None) -> dict:
    return {
        "image_id": f"img{i:05d}",
        "status": status or STATUSES[i % len(STATUSES)],
        "created_at": when,
        "prompt": f"red leather boot {'studio' if i % 3 else 'light'} {i}",
        "tags": {"category": "boot" if i % 2 else "bag"},
    }


def _append(store: CatalogStore, ids: list[int], run: str, when: datetime, status: str | None = None) -> None:
    rows = [_row(i, when + timedelta(seconds=k), status) for k, i in enumerate(ids)]
    store.append(rows, run_id=run, date=f"{when:%Y-%m-%d}")


def _reference(root: Path) -> set[tuple]:
    """(image_id, created_at, run_id) of each image's latest row, ranked over every row."""
    con = duckdb.connect()
    con.register("all_rows", CatalogStore(OutputStore.at(str(root))).read(["image_id", "created_at", "run_id"]))
    return set(
        con.sql(
            "SELECT image_id, created_at, run_id FROM all_rows QUALIFY row_number() OVER "
            "(PARTITION BY image_id ORDER BY created_at DESC, run_id DESC) = 1"
        ).fetchall()
    )


def _views(root: Path, search_index: bool = True) -> set[tuple]:
    con = analysis.connect(str(root), search_index=search_index)
    return set(con.execute("SELECT image_id, created_at, run_id FROM images").fetchall())


def _files(root: Path, run: str) -> list[str]:
    return sorted(p.name for p in root.glob(f"catalog/*/run_id={run}/*.parquet"))


@pytest.fixture()
def catalog(tmp_path):
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    for b in range(3):  # r1: ids 0-11 in three batches
        _append(store, list(range(b * 4, b * 4 + 4)), "r1", T0 + timedelta(minutes=b))
    _append(store, [3, 40], "r1", T0 + timedelta(minutes=9))  # id 3 twice in r1: a later row, same run
    for b in range(2):  # r2: ids 20-27
        _append(store, list(range(20 + b * 4, 24 + b * 4)), "r2", T0 + timedelta(days=1, minutes=b))
    # r3 regenerates ids 1 and 21 a day later (newer rows in another partition) ...
    _append(store, [1, 50], "r3", T0 + timedelta(days=2), status="review")
    _append(store, [21, 51], "r3", T0 + timedelta(days=2, minutes=1), status="accepted")
    # ... and r0's rows for ids 5 and 22 carry an older created_at: the r1 and r2 rows stay the latest
    _append(store, [5, 22, 60], "r0", T0 - timedelta(days=3), status="review")
    _append(store, [61], "r0", T0 - timedelta(days=3, minutes=-1))
    return tmp_path, store


def test_compaction_marks_checked_files_and_lists_contested_ids(catalog):
    root, _ = catalog
    reference = _reference(root)
    assert len(reference) == 12 + 1 + 8 + 2 + 2  # ids 0-11, 40, 20-27, 50-51, 60-61
    assert _views(root) == reference  # uncompacted: every row is ranked
    compact(str(root))
    assert _reference(root) == reference and _views(root) == reference
    manifests = {}
    for run in ("r0", "r1", "r2", "r3"):
        (name,) = _files(root, run)
        assert name.startswith(CONTESTED_PREFIX)  # each shares ids with another run (r1: also inside)
        folder = next(root.glob(f"catalog/*/run_id={run}"))
        manifests[run] = json.loads(next(folder.glob("_compaction-*.json")).read_text())["contested"]
    assert manifests == {
        "r0": ["img00005", "img00022"],
        "r1": ["img00001", "img00003", "img00005"],
        "r2": ["img00021", "img00022"],
        "r3": ["img00001", "img00021"],
    }
    # nothing lost: every row is still in the catalog
    assert CatalogStore(OutputStore.at(str(root))).read(["image_id"]).num_rows == 12 + 2 + 8 + 4 + 4


def test_a_partition_sharing_no_id_is_unique_and_a_later_rerun_still_wins(tmp_path):
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    for b in range(3):
        _append(store, list(range(b * 4, b * 4 + 4)), "r1", T0 + timedelta(minutes=b))
    compact(str(tmp_path))
    (name,) = _files(tmp_path, "r1")
    assert name.startswith(UNIQUE_PREFIX)
    # plain DuckDB still reads it as a hive partition
    assert pq.ParquetFile(next(tmp_path.glob(f"catalog/*/run_id=r1/{name}"))).metadata.num_rows == 12
    # a later run re-renders id 2: an uncompacted batch file, so the checked row is ranked against it
    _append(store, [2], "r2", T0 + timedelta(days=1), status="accepted")
    assert _views(tmp_path) == _reference(tmp_path)
    assert ("img00002", T0 + timedelta(days=1), "r2") in _views(tmp_path)
    _append(store, [30], "r2", T0 + timedelta(days=1, minutes=1))
    compact(str(tmp_path))  # r2 is checked against r1 and contests id 2; r1's file is not rewritten
    assert _files(tmp_path, "r1") == [name] and _files(tmp_path, "r2")[0].startswith(CONTESTED_PREFIX)
    assert _views(tmp_path) == _reference(tmp_path)
    assert ("img00002", T0 + timedelta(days=1), "r2") in _views(tmp_path)


def test_views_search_and_review_queue_agree_with_ranking_every_row(catalog):
    root, _ = catalog
    compact(str(root), partitions=[("2026-12-01", "r1"), ("2026-12-02", "r2")])  # r0, r3 stay batch files
    reference = _reference(root)
    assert _views(root) == reference and _views(root, search_index=False) == reference
    con = analysis.connect(str(root))
    plain = analysis.connect(str(root), search_index=False)
    for text in ("red leather boot", "studio", "light 21"):
        assert analysis.search(con, text, limit=7) == analysis.search(plain, text, limit=7)
        full = con.execute("SELECT image_id, score FROM search_scores($t)", {"t": text}).fetchall()
        want = plain.execute("SELECT image_id, score FROM search_scores($t)", {"t": text}).fetchall()
        assert [i for i, _ in full] == [i for i, _ in want] and len(full) > 3
        assert [s for _, s in full] == pytest.approx([s for _, s in want], rel=1e-12)
    # the review queue: latest rows in review, no decision yet, oldest first
    latest = con.execute("SELECT image_id FROM images WHERE status = 'review' ORDER BY created_at, image_id").fetchall()
    total, rows = pending_page(str(root))
    assert total == len(latest) and [r["image_id"] for r in rows] == [i for (i,) in latest]
    assert "img00001" in {r["image_id"] for r in rows}  # r3's newer row put it in review
    queued = {(r["image_id"], r["run_id"]) for r in rows}
    assert not queued & {("img00005", "r0"), ("img00022", "r0")}  # r0's rows are older than r1's, r2's
    decide(str(root), [rows[0]["image_id"]], "approved", "ana")
    total2, page = pending_page(str(root), limit=2, offset=1)
    assert total2 == total - 1 and [r["image_id"] for r in page] == [i for (i,) in latest[2:4]]


def test_named_queries_page(catalog):
    root, _ = catalog
    con = analysis.connect(str(root))
    _, everything = analysis.run_query(con, "by_tag", {"key": "category", "value": "boot"})
    assert len(everything) > 5
    _, page = analysis.run_query(con, "by_tag", {"key": "category", "value": "boot"}, limit=3, offset=2)
    assert page == everything[2:5]
    with pytest.raises(analysis.AnalysisError, match="--limit of at least 1"):
        analysis.run_query(con, "by_tag", {"key": "category", "value": "boot"}, limit=0)


def test_compacted_files_footers_are_read_once_per_process(catalog, monkeypatch):
    # A compacted file is never rewritten under its name: queries after the first do not read its
    # footer again (a footer per partition is a second of every query at a million images).
    import app.catalog.store as store_module

    root, store = catalog
    compact(OutputStore.at(str(root)))
    reads: list[str] = []
    real = pq.read_schema
    monkeypatch.setattr(store_module.pq, "read_schema", lambda path, **kw: reads.append(path) or real(path, **kw))
    store_module._SCHEMAS.clear()
    live = store.live_files()
    assert store.in_todays_schema(live) and reads
    first = len(reads)
    assert store.in_todays_schema(live) and store.files_dataset(live).count_rows() == 30  # every row written
    assert len(reads) == first  # nothing read again


def test_review_page_reads_the_key_columns_once(catalog, monkeypatch):
    # The queue comes from DuckDB reading the compacted files' rows in review (and the rows of the
    # queued, contested ids); only the page's own partitions are opened whole afterwards.
    root, _ = catalog
    compact(OutputStore.at(str(root)))
    expected = pending_page(str(root), limit=3)
    reads: list[list[str]] = []
    real = CatalogStore.files_dataset
    monkeypatch.setattr(CatalogStore, "files_dataset", lambda self, files: reads.append(files) or real(self, files))
    assert pending_page(str(root), limit=3) == expected and expected[0] > 3
    runs = {f"run_id={r['run_id']}" for r in expected[1]}
    assert len(reads) == 1 and reads[0] and {f.rsplit("/", 2)[-2] for f in reads[0]} == runs  # the page's rows
    # the same queue where the compacted files are scanned by pyarrow (an older catalog's files)
    monkeypatch.setattr(CatalogStore, "duckdb_source", lambda self, checked: None)  # pyarrow reads them
    assert pending_page(str(root), limit=3) == expected


@pytest.mark.parametrize("run", [None, "r0", "r1", "r3"])
def test_review_queue_is_the_same_read_by_duckdb_or_pyarrow(catalog, monkeypatch, run):
    # Half compacted: contested ids, a newer row in a batch file, an older one in another run.
    root, _ = catalog
    compact(str(root), partitions=[("2026-12-01", "r1"), ("2026-12-02", "r2")])
    by_duckdb = [pending_page(str(root), run=run, limit=2, offset=o) for o in (0, 1, 2)]
    assert by_duckdb[0][0] > 0 or run == "r1"
    monkeypatch.setattr(CatalogStore, "duckdb_source", lambda self, checked: None)  # pyarrow reads them
    assert [pending_page(str(root), run=run, limit=2, offset=o) for o in (0, 1, 2)] == by_duckdb


def _latest_view_sql(root: Path) -> str:
    con = analysis.connect(str(root), search_index=False)
    (sql,) = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'catalog_latest'").fetchone()
    return sql


def test_the_catalog_is_read_once_where_superseded_rows_have_a_key_of_their_own(catalog):
    root, _ = catalog
    reference = _reference(root)
    for step in ("before compaction", "after"):
        # rows of an uncompacted file or of a contested id: superseded ones are dropped by key in one pass
        assert "catalog_superseded" in _latest_view_sql(root), step
        assert _views(root, search_index=False) == reference, step
        compact(str(root))


def test_rows_tied_on_their_key_keep_the_general_ranking(catalog):
    root, store = catalog
    # the same image twice with the same created_at in one run: the key cannot tell them apart, so
    # the catalog is ranked as analysis/views.sql says (one row kept), not dropped by key
    _append(store, [70, 71], "r4", T0 + timedelta(days=4))
    _append(store, [70], "r4", T0 + timedelta(days=4))
    reference = _reference(root)
    assert "catalog_superseded" not in _latest_view_sql(root)
    con = analysis.connect(str(root), search_index=False)
    rows = con.execute("SELECT image_id, created_at, run_id FROM images").fetchall()
    assert len(rows) == len(set(rows)) and set(rows) == reference
    assert sum(1 for r in rows if r[0] == "img00070") == 1
