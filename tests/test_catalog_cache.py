"""The local cache of compacted catalog files kept on object storage (app/catalog/cache.py), on S3
over real HTTP on loopback (moto's server): a later query fetches no compacted file again, a
replaced object is fetched again, a damaged copy is never read, the bound evicts, and the rows
are the same with the cache and without."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from analysis_catalog import make_output
from moto_s3 import loopback_s3

import analysis
from app.catalog import cache
from app.catalog.compact import compact
from app.catalog.store import COMPACTED_PREFIX, CatalogStore
from app.storage import OutputStore

pytest.importorskip("moto.server")

URI = "s3://cached/outputs"
QUERY = "SELECT image_id, outcome, date, run_id FROM images ORDER BY image_id"


@pytest.fixture(scope="module")
def s3_catalog():
    with loopback_s3("cached"):
        make_output(URI)
        split_batches(URI)
        assert compact(URI, older_than_s=0).partitions >= 2
        yield URI


def split_batches(uri: str) -> None:
    """Each batch file written again as two, as smaller batches would have been (compaction leaves
    a partition of one file as it is)."""
    store = CatalogStore(OutputStore.at(uri))
    fs, _ = store.output.fs_and_root
    for path in store.live_files():
        table = pq.read_table(path, filesystem=fs, partitioning=None)
        half = max(1, table.num_rows // 2)
        for n, part in enumerate((table.slice(0, half), table.slice(half))):
            buf = io.BytesIO()
            pq.write_table(part, buf, compression="zstd")
            with fs.open_output_stream(path.replace(".parquet", f"-{n}.parquet")) as f:
                f.write(buf.getvalue())
        fs.delete_file(path)


@pytest.fixture
def cache_at(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEFAB_CATALOG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMAGEFAB_CATALOG_CACHE_BYTES", raising=False)
    return tmp_path / "cache"


def rows(uri: str) -> list[tuple]:
    return analysis.connect(uri).execute(QUERY).fetchall()


def compacted(uri: str) -> list[str]:
    store = CatalogStore(OutputStore.at(uri))
    return [f for f in store.live_files() if f.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)]


def cached_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


def fetches() -> int:
    return cache.STATS.fetches


def test_second_query_reads_no_compacted_file_from_the_store_and_rows_match(s3_catalog, cache_at, monkeypatch):
    files = compacted(s3_catalog)
    assert files, "the fixture catalog has compacted files"
    before = fetches()
    first = rows(s3_catalog)
    fetched = fetches() - before  # each compacted file, and the search index's segments
    assert sorted(
        p.name.split(".")[0] + ".parquet" for p in cached_files(cache_at) if p.name.startswith("compacted-")
    ) == sorted(f.rsplit("/", 1)[1] for f in files)
    assert fetched == len(cached_files(cache_at))
    hits = cache.STATS.hits
    assert rows(s3_catalog) == first
    assert fetches() - before == fetched  # nothing fetched again
    assert cache.STATS.hits - hits >= len(files)
    monkeypatch.setenv("IMAGEFAB_CATALOG_CACHE_BYTES", "0")  # off: read from the store as before
    assert rows(s3_catalog) == first
    assert fetches() - before == fetched


def test_replaced_object_is_fetched_again(s3_catalog, cache_at):
    first = rows(s3_catalog)
    path = compacted(s3_catalog)[0]
    output = OutputStore.at(s3_catalog)
    fs, _ = output.fs_and_root
    table = pq.read_table(path, filesystem=fs, partitioning=None)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")  # the same rows in another object
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())
    before = fetches()
    assert rows(s3_catalog) == first
    assert fetches() - before == 1  # that object only


def test_damaged_copy_is_never_read(s3_catalog, cache_at):
    first = rows(s3_catalog)
    victim = next(p for p in cached_files(cache_at) if p.name.startswith("compacted-"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a partial file
    before, rejected = fetches(), cache.STATS.rejected
    assert rows(s3_catalog) == first
    assert cache.STATS.rejected - rejected == 1 and fetches() - before == 1
    victim = next(p for p in cached_files(cache_at) if p.name.startswith("compacted-"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-4] + b"XXXX")  # the right size, not a whole Parquet file
    assert rows(s3_catalog) == first
    assert cache.STATS.rejected - rejected == 2


def test_size_bound_evicts_least_recently_used(s3_catalog, cache_at, monkeypatch):
    output = OutputStore.at(s3_catalog)
    fs, _ = output.fs_and_root
    files = compacted(s3_catalog)
    assert len(files) >= 2
    infos = {f: fs.get_file_info(f) for f in files}
    largest = max(i.size for i in infos.values())
    monkeypatch.setenv("IMAGEFAB_CATALOG_CACHE_BYTES", str(largest))
    for f in files:
        cache.local_copies(fs, {f: (infos[f].size, infos[f].mtime_ns)})
        assert sum(p.stat().st_size for p in cached_files(cache_at)) <= largest
    assert len(cached_files(cache_at)) == 1 and cached_files(cache_at)[0].name.startswith(
        files[-1].rsplit("/", 1)[1][:-8]
    )


def test_bad_bound_is_named():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMAGEFAB_CATALOG_CACHE_BYTES", "lots")
        with pytest.raises(ValueError, match="IMAGEFAB_CATALOG_CACHE_BYTES"):
            cache.cache_bytes()


def test_search_index_segments_are_read_from_local_copies(s3_catalog, cache_at, monkeypatch):
    def hits() -> list[tuple]:
        found = analysis.search(analysis.connect(s3_catalog), "sword", limit=20)
        return [tuple(r) for r in found.itertuples(index=False)] if hasattr(found, "itertuples") else found

    first = hits()  # builds and persists the index on the store, then reads its segments
    assert first
    before = fetches()
    second = hits()
    assert second == first
    assert fetches() == before  # segments and compacted files: all from the local copies
    assert any(".docs." in p.name for p in cached_files(cache_at))
    monkeypatch.setenv("IMAGEFAB_CATALOG_CACHE_BYTES", "0")
    assert hits() == first
