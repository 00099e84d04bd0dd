"""Appending catalog rows and looking them up (resume, regenerate).

Each append writes one new Parquet file; nothing is ever rewritten, so a crash loses at most the
batch in flight and readers never see half a file (see app/storage.py). Compaction
(app/catalog/compact.py) later merges a partition's files into one; readers here see exactly the
live files (`live_files`): a compacted file once its manifest is written, its inputs until then.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.catalog import cache
from app.catalog.schema import CATALOG_SCHEMA, conform, to_table
from app.storage import OutputStore, StorageError

CATALOG_DIR = "catalog"
COMPACTED_PREFIX = "compacted-"  # compacted-<hash of the inputs>.parquet
MANIFEST_PREFIX = "_compaction-"  # _compaction-<same hash>.json: the commit of that file
T = TypeVar("T")
READ_ATTEMPTS = 5  # listings a read makes when compaction deletes a file under it
# A compacted file whose rows were checked against the whole catalog when it was written:
# compacted-u-<hash>: each of its image_ids is in no other row of the catalog (at that time);
# compacted-c-<hash>: the same, except the ids its manifest lists under "contested".
# Readers skip the latest-row-per-image step for those rows (see `partitioned_files`).
UNIQUE_PREFIX = COMPACTED_PREFIX + "u-"
CONTESTED_PREFIX = COMPACTED_PREFIX + "c-"


def sql_string(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def manifest_name(compacted: str) -> str:
    return MANIFEST_PREFIX + compacted.removeprefix(COMPACTED_PREFIX).removesuffix(".parquet") + ".json"


# Footers of compacted files read by this process: a compacted file is never rewritten under
# its name (the name is a hash of its inputs, compact.py), so its schema is read once, not on
# every query (a footer per partition is a second at a million images, several on object storage).
_SCHEMAS: dict[str, pa.Schema] = {}
_SCHEMAS_KEPT = 16_384


def _physical_schema(fs: pafs.FileSystem, path: str) -> pa.Schema:
    """The schema written in a catalog file's footer (a compacted file's from memory after once)."""
    compacted = path.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)
    key = f"{fs.type_name}:{path}"
    if compacted and key in _SCHEMAS:
        return _SCHEMAS[key]
    try:
        schema = pq.read_schema(path, filesystem=fs)
    except OSError as e:
        raise StorageError(f"{path}: cannot read catalog file ({e})") from e
    if compacted:
        if len(_SCHEMAS) >= _SCHEMAS_KEPT:
            _SCHEMAS.pop(next(iter(_SCHEMAS)))
        _SCHEMAS[key] = schema
    return schema


def _needs_conversion(physical: pa.Schema) -> bool:
    """Whether a file's columns cannot be cast to the declared types while scanning (text where a
    struct is declared now, or the reverse). Decided once per schema a process has read."""
    known = _CONVERSION.get(id(physical))
    if known is not None and known[0] is physical:
        return known[1]
    needs = any(
        pa.types.is_struct(CATALOG_SCHEMA.field(f.name).type) != pa.types.is_struct(f.type)
        for f in physical
        if f.name in CATALOG_SCHEMA.names
    )
    if len(_CONVERSION) >= _SCHEMAS_KEPT:
        _CONVERSION.pop(next(iter(_CONVERSION)))
    _CONVERSION[id(physical)] = (physical, needs)
    return needs


_CONVERSION: dict[int, tuple[pa.Schema, bool]] = {}

# Size and modification time of the compacted files of object-store catalogs, as last listed by
# this process: the key of their local copies (app/catalog/cache.py).
_LISTED: dict[str, tuple[int, int]] = {}


@dataclass(frozen=True)
class CatalogStore:
    output: OutputStore

    def append(self, rows: list[dict], *, run_id: str, date: str) -> str | None:
        """Write `rows` as one new file. Its name comes from the run and the image ids, so a batch
        that Ray retries after a crash (a killed actor) replaces its own file instead of adding
        its rows a second time: each image is catalogued exactly once per run."""
        if not rows:
            return None
        table = to_table(rows)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        key = hashlib.sha256("\n".join([run_id, *sorted(r["image_id"] for r in rows)]).encode()).hexdigest()[:32]
        rel = f"{CATALOG_DIR}/date={date}/run_id={run_id}/part-{key}.parquet"
        return self.output.write_bytes(rel, buf.getvalue())

    @property
    def base(self) -> str:
        return self.output.path(CATALOG_DIR)

    def listing(self) -> list[pafs.FileInfo] | None:
        """Every file under catalog/ (one recursive listing), or None when there is no catalog."""
        fs, _ = self.output.fs_and_root

        def listed() -> list[pafs.FileInfo] | None:
            if fs.get_file_info(self.base).type == pafs.FileType.NotFound:
                return None
            return [
                i
                for i in fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
                if i.type == pafs.FileType.File
            ]

        try:  # an object store that stops answering is waited for, as for writes (app/storage.py)
            found = self.output.waiting_out_outages(listed, self.output.uri_of(CATALOG_DIR))
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"{self.output.uri_of(CATALOG_DIR)}: cannot list catalog ({e})") from e
        if found and not self.output.is_local:
            for i in found:
                if i.base_name.startswith(COMPACTED_PREFIX) and i.size is not None:
                    _LISTED[f"{fs.type_name}:{i.path}"] = (i.size, i.mtime_ns or 0)
        return found

    def cached(self, files: list[str]) -> dict[str, str]:
        """Local copies of the compacted files among `files` of an object-store catalog
        {store path: local path} (app/catalog/cache.py); {} for a local catalog or with the cache off."""
        if self.output.is_local:
            return {}
        fs, _ = self.output.fs_and_root
        wanted = {}
        for f in files:
            if f.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX):
                listed = _LISTED.get(f"{fs.type_name}:{f}")
                if listed is None:
                    info = fs.get_file_info(f)
                    if info.type != pafs.FileType.File:
                        raise FileNotFoundError(f)
                    listed = (info.size or 0, info.mtime_ns or 0)
                wanted[f] = listed
        return cache.local_copies(fs, wanted)

    def live_files(self, listing: list[pafs.FileInfo] | None = None) -> list[str]:
        """The data files a reader must read, each row once (see app/catalog/compact.py):
        batch files and committed compacted files, less the inputs of committed compactions and
        any compacted file whose manifest was never written. A partition that holds only its
        compacted file costs no read beyond the listing."""
        listing = self.listing() if listing is None else listing
        if not listing:
            return []
        by_dir: dict[str, dict[str, pafs.FileInfo]] = {}
        for info in listing:
            by_dir.setdefault(info.path.rsplit("/", 1)[0], {})[info.base_name] = info
        live: list[str] = []
        for folder, files in sorted(by_dir.items()):
            committed = {n for n in files if n.startswith(COMPACTED_PREFIX) and manifest_name(n) in files}
            data = [n for n in files if n.endswith(".parquet") and not n.startswith((".", "_"))]
            data = [n for n in data if not n.startswith(COMPACTED_PREFIX) or n in committed]
            if (committed and len(data) > len(committed)) or len(committed) > 1:
                replaced: set[str] = set()
                for name in committed:
                    replaced.update(self.read_manifest(f"{folder}/{manifest_name(name)}")["inputs"])
                data = [n for n in data if n not in replaced]
            live.extend(f"{folder}/{n}" for n in sorted(data))
        return live

    def partitioned_files(self, live: list[str]) -> tuple[list[str], list[str], list[str]]:
        """The live files split for readers that want one row per image_id:
        (checked compacted files, the other files, the contested ids of the checked ones).

        A row of a checked file whose image_id is neither contested nor in one of the other
        files is the only row of that image in the catalog: the latest, with no comparison.
        Every other row must be compared with the rest of its image's rows. Why this holds: a
        compaction checks its partition's ids against every live row of the catalog (compact.py);
        of two rows of one image in two checked files, the file written later saw the other
        row (in whichever file held it then) and listed the id as contested; a row written after
        that is in an uncompacted file until its own compaction checks it."""
        checked: list[str] = []
        other: list[str] = []
        contested: list[str] = []
        for path in live:
            name = path.rsplit("/", 1)[-1]
            if name.startswith(UNIQUE_PREFIX):
                checked.append(path)
            elif name.startswith(CONTESTED_PREFIX):
                checked.append(path)
                manifest = self.read_manifest(f"{path.rsplit('/', 1)[0]}/{manifest_name(name)}")
                contested.extend(manifest.get("contested") or [])
            else:
                other.append(path)
        return checked, other, sorted(set(contested))

    def read_manifest(self, path: str) -> dict:
        fs, _ = self.output.fs_and_root
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (OSError, ValueError) as e:
            raise StorageError(f"{path}: cannot read compaction manifest ({e})") from e

    def dataset(self) -> pads.Dataset | None:
        """The live files as one dataset in today's schema, with `date` and `run_id` from the
        partition folders; None when there is no catalog."""
        listing = self.listing()
        if listing is None:
            return None
        return self.files_dataset(self.live_files(listing))

    def files_dataset(self, files: list[str]) -> pads.Dataset:
        """Some of the live files as a dataset, as `dataset` reads them."""
        fs, _ = self.output.fs_and_root
        part = pads.partitioning(pa.schema([("date", pa.string()), ("run_id", pa.string())]), flavor="hive")
        schema = CATALOG_SCHEMA.append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string()))
        local = self.cached(files)
        old = self._files_needing_conversion(files, local)
        scanned = pads.dataset(
            [f for f in files if f not in old and f not in local],
            filesystem=fs,
            format="parquet",
            partitioning=part,
            partition_base_dir=self.base,
            schema=schema,
            exclude_invalid_files=False,
        )
        if local and set(local) - old:
            copies = pads.dataset(
                [local[f] for f in files if f in local and f not in old],
                filesystem=pafs.LocalFileSystem(),
                format="parquet",
                partitioning=part,
                partition_base_dir=cache.partition_base(fs, self.base),
                schema=schema,
                exclude_invalid_files=False,
            )
            scanned = pads.dataset([copies, scanned]) if len(local) < len(files) else copies
        if not old:
            return scanned
        # Files of a release whose column had another kind of type (text where a struct is now
        # declared): converted in memory (schema.conform) until compaction rewrites them.
        tables = []
        for path in sorted(old):
            if path in local:
                t = pq.read_table(local[path], partitioning=None)
            else:
                t = pq.read_table(path, filesystem=fs, partitioning=None)
            t = conform(t, path).select(CATALOG_SCHEMA.names)
            date, run_id = (seg.split("=", 1)[1] for seg in path[len(self.base) + 1 :].split("/")[:2])
            t = t.append_column("date", pa.array([date] * t.num_rows, pa.string()))
            tables.append(t.append_column("run_id", pa.array([run_id] * t.num_rows, pa.string())))
        return pads.dataset([scanned, pads.dataset(pa.concat_tables(tables), schema=schema)])

    def in_todays_schema(self, files: list[str]) -> bool:
        """Whether every file has exactly today's columns and types (CATALOG_SCHEMA), so that any
        Parquet reader gets the same rows the dataset does (one footer read per file)."""
        local = self.cached(files)
        for path in files:
            if not self._footer(path, local).remove_metadata().equals(CATALOG_SCHEMA.remove_metadata()):
                return False
        return True

    def duckdb_source(self, checked: list[str]) -> str | None:
        """`read_parquet([...])` of checked compacted files for DuckDB's own Parquet reader (several
        times faster than scanning a pyarrow dataset): the local files, or on object storage their
        local copies (app/catalog/cache.py; the same partition folders), when every one is there and
        in today's schema; None otherwise (read them through `files_dataset`)."""
        if not checked:
            return None
        local = {} if self.output.is_local else self.cached(checked)
        readable = checked if self.output.is_local else [local[f] for f in checked if f in local]
        if len(readable) != len(checked) or not self.in_todays_schema(checked):
            return None
        files = ", ".join(sql_string(f) for f in readable)
        return f"read_parquet([{files}], hive_partitioning = true, hive_types = {{'date': VARCHAR, 'run_id': VARCHAR}})"

    def _footer(self, path: str, local: dict[str, str]) -> pa.Schema:
        """The schema in a catalog file's footer, from its local copy where there is one."""
        if path in local:
            return _physical_schema(pafs.LocalFileSystem(), local[path])
        fs, _ = self.output.fs_and_root
        return _physical_schema(fs, path)

    def _files_needing_conversion(self, files: list[str], local: dict[str, str] | None = None) -> set[str]:
        """Files whose columns cannot be cast to the declared types while scanning. Files of one
        partition come from one run of one release, so one footer per partition decides (read
        from the local copy where there is one)."""
        local = local or {}
        by_dir: dict[str, list[str]] = {}
        for f in files:
            by_dir.setdefault(f.rsplit("/", 1)[0], []).append(f)
        old: set[str] = set()
        for group in by_dir.values():
            first = next((f for f in group if f in local), group[0])
            if _needs_conversion(self._footer(first, local)):
                old.update(group)
        return old

    def read(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        """The live rows (listed again if a compaction deletes a file under the read: `reading`)."""

        def once() -> pa.Table:
            ds = self.dataset()
            if ds is None:
                schema = CATALOG_SCHEMA.append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string()))
                table = schema.empty_table()
                return table.select(columns) if columns else table
            return ds.to_table(columns=columns, filter=filter)

        return self.reading(once)

    def reading(self, read: Callable[[], T]) -> T:
        """`read()`: a listing of the catalog and reads of what it listed. A compaction (a run's
        closing one, or `imagefab catalog compact`) may delete batch files the read has just
        listed: the rows are then in the compacted file already committed, and `read` runs again.
        Other failures are a `StorageError` naming the catalog."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return read()
            except (OSError, pa.ArrowInvalid) as e:  # a file gone or unreadable, the store away
                gone = isinstance(e, FileNotFoundError) or isinstance(e.__cause__, FileNotFoundError)
                if gone and attempt < READ_ATTEMPTS - 1:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                if isinstance(e, StorageError):
                    raise
                raise StorageError(f"{self.output.uri_of(CATALOG_DIR)}: cannot read catalog ({e})") from e
        raise AssertionError("unreachable")

    def done_ids(self) -> set[str]:
        """Ids a rerun must not render again: every id in the catalog except those that only
        failed for a passing reason (an out-of-memory error, a lost worker). A row that failed
        because the input is bad (`bad_row: …`, `bad_input: …`) or its prompt was blocked
        (`prompt_blocked: …`) stays done: it would fail the same way again (a fixed input image has
        another sha256, so another image_id). One stopped on budget is not done."""
        t = self.read(["image_id", "status", "error"])
        done = set()
        for image_id, status, error in zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error"))):
            if status != "failed" or (error or "").startswith(("bad_row", "bad_input", "prompt_blocked")):
                done.add(image_id)
        return done

    def find(self, image_id: str) -> dict | None:
        rows = self.read(filter=pads.field("image_id") == image_id).to_pylist()
        return rows[-1] if rows else None

    def batch_rows(self, batch_id: str) -> list[dict]:
        rows = self.read(filter=pads.field("batch_id") == batch_id).to_pylist()
        # A row that a crashed compaction left in two files is the same row: keep it once.
        return list({(r["image_id"], r["created_at"]): r for r in rows}.values())
