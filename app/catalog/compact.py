"""Compaction: a partition's many batch files become one large file, without losing or doubling a row.

A run writes one Parquet file per batch (4 images by default), so a year of production is
hundreds of thousands of files, and every query pays for each (a request each on object
storage). Compaction rewrites one partition (`date=…/run_id=…`) at a time:

  1. recover: finish any earlier compaction of the partition that was cut off (below);
  2. write `compacted-u-<h>.parquet` (or `compacted-c-<h>`, below), every row of the inputs in
     today's schema (schema.conform), sorted by image_id, in row groups of `ROW_GROUP_ROWS`;
     `<h>` hashes the input names;
  3. write `_compaction-<h>.json`, the manifest listing the inputs: the commit point;
  4. delete the inputs, only those the manifest lists (a batch a run writes meanwhile stays);
  5. delete the manifests of compacted files that this compaction consumed.

Each file appears at once and whole (app/storage.py), so a reader through imagefab
(CatalogStore.live_files) sees either the inputs (no manifest yet; a compacted file without its
manifest is ignored) or the compacted file (the manifest's inputs are ignored even while they
still exist): never a row twice, never a row missing. A `kill -9` between any two steps leaves
one of those states, and the next compaction of the partition finishes it: it deletes the
inputs of every committed manifest and the leftovers of an uncommitted one. Nothing is deleted
unless the file that replaces it exists.

Before writing, the partition's image_ids are checked against every other live row of the
catalog (`IdSnapshot`, one read of the image_id column, taken after the partition was listed).
An id that occurs twice in the partition, or also elsewhere (a rerun or regeneration wrote a
newer row for it in another run), is *contested*: the file is then `compacted-c-<h>` and the
manifest lists those ids. The views and the search index take every other row of such a file as
the latest of its image without comparing it with the rest of the catalog (the window over all
rows is what made every query cost as much as sorting the catalog); see
CatalogStore.partitioned_files for why that holds while runs keep writing and compacting.

Tools reading the Parquet files directly (DuckDB, Polars, Ray Data, Spark on
`catalog/**/*.parquet`) see the usual hive layout; during the moment between steps 3 and 4
they may read a row in two files, which the `images` view (one row per image_id) absorbs.
Rows that two crashed or concurrent compactions left in two compacted files are merged by the
next compaction, which keeps one row per (image_id, created_at).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.catalog.schema import conform
from app.catalog.store import (
    COMPACTED_PREFIX,
    CONTESTED_PREFIX,
    MANIFEST_PREFIX,
    UNIQUE_PREFIX,
    CatalogStore,
    manifest_name,
)
from app.storage import OutputStore, StorageError

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 100_000  # DuckDB and Ray Data parallelise over row groups; ~100k rows is ~10–40 MB here
LOCK_NAME = "_compaction.lock"
STALE_LOCK_S = 3600.0  # a lock older than this belongs to a compaction that died
ORPHAN_AGE_S = 3600.0  # an uncommitted compacted file older than this was left by a dead compaction
_CRASH_ENV = "IMAGEFAB_COMPACT_CRASH_AFTER"  # tests: the step after which the process kills itself


@dataclass
class CompactionResult:
    partitions: int = 0  # partitions rewritten
    files_in: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    recovered: int = 0  # cut-off compactions finished
    skipped: list[str] = field(default_factory=list)  # partitions another compaction holds

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _crash_point(step: str) -> None:
    if os.environ.get(_CRASH_ENV) == step:
        os.kill(os.getpid(), 9)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in `30m`, `12h`, `7d`, `90s` or a bare number of seconds."""
    m = _DURATION.match(text or "")
    if not m:
        raise ValueError(f"--older-than must look like 30m, 12h or 7d, not {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


class _Lock:
    """One compaction per partition at a time: a lock file created exclusively on a local disk;
    on object storage a lock object read back after writing (the last writer wins, the loser
    sees another owner and leaves the partition alone)."""

    def __init__(self, output: OutputStore, folder: str):
        self.output, self.path = output, f"{folder}/{LOCK_NAME}"
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def acquire(self) -> bool:
        fs, _ = self.output.fs_and_root
        info = fs.get_file_info(self.path)
        if info.type == pafs.FileType.File:
            age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
            if age < STALE_LOCK_S and not self._holder_died(fs):
                return False
            _delete(fs, self.path)
        if self.output.is_local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            return True
        with fs.open_output_stream(self.path) as f:
            f.write(self.token.encode())
        with fs.open_input_stream(self.path) as f:
            return f.read().decode() == self.token

    def _holder_died(self, fs: pafs.FileSystem) -> bool:
        """The lock was taken on this host by a process that no longer runs (a kill -9)."""
        try:
            with fs.open_input_stream(self.path) as f:
                host, pid, _ = f.read().decode().split(":")
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def release(self) -> None:
        fs, _ = self.output.fs_and_root
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(self.path)


def _partitions(listing: Iterable[pafs.FileInfo]) -> dict[str, dict[str, pafs.FileInfo]]:
    by_dir: dict[str, dict[str, pafs.FileInfo]] = {}
    for info in listing:
        by_dir.setdefault(info.path.rsplit("/", 1)[0], {})[info.base_name] = info
    return by_dir


def _delete(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def _recover(store: CatalogStore, folder: str, files: dict[str, pafs.FileInfo]) -> int:
    """Finish cut-off compactions in one partition; returns how many were finished."""
    fs, _ = store.output.fs_and_root
    finished = 0
    now = time.time()
    for name in sorted(files):
        if name.startswith(COMPACTED_PREFIX) and manifest_name(name) not in files:
            info = files[name]
            if info.mtime is None or now - info.mtime.timestamp() > ORPHAN_AGE_S:
                _delete(fs, f"{folder}/{name}")  # never committed: its rows are still in its inputs
                files.pop(name)
    for name in sorted(n for n in files if n.startswith(MANIFEST_PREFIX)):
        manifest = store.read_manifest(f"{folder}/{name}")
        output = manifest["output"]
        if output in files:
            left = [i for i in manifest["inputs"] if i in files]
            for i in left:
                _delete(fs, f"{folder}/{i}")
                files.pop(i)
            finished += bool(left)
        elif not any(i in files for i in manifest["inputs"]):
            _delete(fs, f"{folder}/{name}")  # its compacted file was compacted again
            files.pop(name)
    return finished


def _read_rows(store: CatalogStore, folder: str, names: list[str]) -> pa.Table:
    fs, _ = store.output.fs_and_root
    tables = []
    for name in names:
        path = f"{folder}/{name}"
        try:
            t = pq.read_table(path, filesystem=fs, partitioning=None)
        except OSError as e:
            raise StorageError(f"{path}: cannot read catalog file ({e})") from e
        tables.append(conform(t.drop_columns([c for c in ("date", "run_id") if c in t.column_names]), path))
    table = pa.concat_tables(tables, promote_options="permissive")
    # One row per (image_id, created_at): the same row twice is what a cut-off or concurrent
    # compaction can leave; a rerun's later row for the same image has a later created_at.
    key = pc.binary_join_element_wise(
        table.column("image_id").fill_null(""), pc.cast(table.column("created_at"), pa.string()).fill_null(""), "\x1f"
    )
    keys = key.to_pylist()
    if len(set(keys)) < len(keys):
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        table = table.take(sorted(first.values()))
    return table.sort_by([("image_id", "ascending"), ("created_at", "ascending")])


class IdSnapshot:
    """The image_id of every live catalog row and the partition folder holding it, read once
    (the image_id column only) after the partitions to compact were listed."""

    def __init__(self, store: CatalogStore, attempts: int = 5):
        fs, _ = store.output.fs_and_root
        for attempt in range(attempts):
            live = store.live_files()
            try:
                ds = pads.dataset(live, filesystem=fs, format="parquet", schema=pa.schema([("image_id", pa.string())]))
                ids, folders = [], []
                for tagged in ds.scanner(columns=["image_id"]).scan_batches():
                    ids.append(tagged.record_batch.column(0))
                    folders.append(pa.repeat(tagged.fragment.path.rsplit("/", 1)[0], tagged.record_batch.num_rows))
                break
            except (FileNotFoundError, pa.ArrowInvalid, OSError) as e:
                # a concurrent compaction deleted its inputs between the listing and the read
                if attempt == attempts - 1:
                    raise StorageError(f"{store.output.uri_of('catalog')}: cannot read the catalog's ids ({e})") from e
        self.ids = pa.chunked_array(ids, pa.string())
        self.folders = pa.chunked_array(folders, pa.string())

    def elsewhere(self, folder: str, ids: pa.Array | pa.ChunkedArray) -> set[str]:
        """Which of `ids` have a row outside `folder`."""
        hit = pc.is_in(self.ids, value_set=pc.unique(ids).drop_null())
        ids_hit, folders_hit = self.ids.filter(hit), self.folders.filter(hit)
        return {i for i, f in zip(ids_hit.to_pylist(), folders_hit.to_pylist(), strict=True) if f != folder}


def contested_ids(table: pa.Table, folder: str, snapshot: IdSnapshot) -> list[str]:
    """Ids of `table` (a partition's rows) that are not the only row of their image: twice in
    the partition, or also in another partition."""
    ids = table.column("image_id")
    counts = pc.value_counts(ids.drop_null())
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()
    return sorted(set(twice) | snapshot.elsewhere(folder, ids))


def compact_partition(
    store: CatalogStore, folder: str, files: dict[str, pafs.FileInfo], snapshot: IdSnapshot | None = None
) -> CompactionResult:
    """Compact one partition folder (`<catalog>/date=…/run_id=…`); `files` is its listing.
    `snapshot` must have been read after that listing (one is read here when not given)."""
    result = CompactionResult()
    fs, _ = store.output.fs_and_root
    lock = _Lock(store.output, folder)
    if not lock.acquire():
        result.skipped.append(folder)
        return result
    try:
        t0 = time.perf_counter()
        files = dict(files)
        result.recovered = _recover(store, folder, files)
        inputs = sorted(
            n
            for n in files
            if n.endswith(".parquet")
            and not n.startswith((".", "_"))
            and (not n.startswith(COMPACTED_PREFIX) or manifest_name(n) in files)
        )
        if len(inputs) < 2:
            return result
        _crash_point("listed")
        table = _read_rows(store, folder, inputs)
        contested = contested_ids(table, folder, snapshot or IdSnapshot(store))
        digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:24]
        out_name = f"{CONTESTED_PREFIX if contested else UNIQUE_PREFIX}{digest}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        _write(store.output, f"{folder}/{out_name}", buf.getvalue())
        _crash_point("written")
        manifest = {
            "output": out_name,
            "inputs": inputs,
            "rows": table.num_rows,
            "contested": contested,
            "compacted_at": datetime.now(UTC).isoformat(),
        }
        _write(store.output, f"{folder}/{manifest_name(out_name)}", json.dumps(manifest, indent=1).encode())
        _crash_point("committed")
        for i, name in enumerate(inputs):
            _delete(fs, f"{folder}/{name}")
            if i == 0:
                _crash_point("deleting")
        # Manifests of compacted files just consumed: their inputs are long gone.
        for name in inputs:
            if name.startswith(COMPACTED_PREFIX):
                _delete(fs, f"{folder}/{manifest_name(name)}")
        result.partitions, result.files_in, result.rows = 1, len(inputs), table.num_rows
        result.bytes_in = sum(files[n].size or 0 for n in inputs)
        result.bytes_out = buf.tell()
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        lock.release()


def _write(output: OutputStore, path: str, data: bytes) -> None:
    root = output.fs_and_root[1].rstrip("/") + "/"
    output.write_bytes(path[len(root) :], data)


def compact(
    output: OutputStore | str,
    *,
    older_than_s: float = 0.0,
    partitions: Iterable[tuple[str, str]] | None = None,
) -> CompactionResult:
    """Compact every partition whose newest file is older than `older_than_s` (0: all), or only
    the given (date, run_id) partitions."""
    output = output if isinstance(output, OutputStore) else OutputStore.at(output)
    store = CatalogStore(output)
    total = CompactionResult()
    listing = store.listing()
    if not listing:
        return total
    wanted = {f"{store.base}/date={d}/run_id={r}" for d, r in partitions} if partitions is not None else None
    now = time.time()
    t0 = time.perf_counter()
    todo = []
    for folder, files in sorted(_partitions(listing).items()):
        if wanted is not None and folder not in wanted:
            continue
        if older_than_s > 0:
            newest = max((i.mtime.timestamp() for i in files.values() if i.mtime), default=now)
            if now - newest < older_than_s:
                continue
        todo.append((folder, files))
    snapshot = IdSnapshot(store) if todo else None  # after the listing, for every partition below
    for folder, files in todo:
        r = compact_partition(store, folder, files, snapshot)
        total.partitions += r.partitions
        total.files_in += r.files_in
        total.rows += r.rows
        total.bytes_in += r.bytes_in
        total.bytes_out += r.bytes_out
        total.recovered += r.recovered
        total.skipped += r.skipped
    total.seconds = time.perf_counter() - t0
    return total


def compact_run(output: OutputStore | str, date: str, run_id: str) -> CompactionResult | None:
    """The end of a bulk run: compact its partition. The run's images and rows are already
    written, so a failure here is logged, not raised; `imagefab catalog compact` redoes it."""
    try:
        return compact(output, partitions=[(date, run_id)])
    except (OSError, ValueError) as e:
        log.warning("catalog compaction of run %s failed (rerun `imagefab catalog compact`): %s", run_id, e)
        return None


def cli_compact(output: str, older_than: str) -> int:
    import sys

    try:
        older_than_s = parse_duration(older_than)
    except ValueError as e:
        print(f"imagefab: error: {e}", file=sys.stderr)
        return 2
    result = compact(output, older_than_s=older_than_s)
    mb = 1 / 2**20
    print(
        f"compacted {result.partitions} partition(s): {result.files_in} files, {result.rows} rows, "
        f"{result.bytes_in * mb:.1f} MB -> {result.bytes_out * mb:.1f} MB in {result.seconds:.1f} s"
        + (f"; finished {result.recovered} cut-off compaction(s)" if result.recovered else "")
    )
    for folder in result.skipped:
        print(f"skipped {folder}: another compaction holds it")
    return 0
