"""Appending catalog rows and looking them up (resume, regenerate).

Each append writes one new Parquet file; nothing is ever rewritten, so a crash loses at most the
batch in flight and readers never see half a file (see app/storage.py).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from app.catalog.schema import CATALOG_SCHEMA, to_table
from app.storage import OutputStore, StorageError

CATALOG_DIR = "catalog"


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

    def dataset(self) -> pads.Dataset | None:
        fs, root = self.output.fs_and_root
        base = f"{root.rstrip('/')}/{CATALOG_DIR}"
        try:
            info = fs.get_file_info(base)
        except OSError as e:
            raise StorageError(f"{self.output.uri_of(CATALOG_DIR)}: cannot list catalog ({e})") from e
        if info.type == pa.fs.FileType.NotFound:
            return None
        part = pads.partitioning(pa.schema([("date", pa.string()), ("run_id", pa.string())]), flavor="hive")
        return pads.dataset(
            base,
            filesystem=fs,
            format="parquet",
            partitioning=part,
            schema=CATALOG_SCHEMA.append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string())),
            exclude_invalid_files=False,
        )

    def read(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        ds = self.dataset()
        if ds is None:
            schema = CATALOG_SCHEMA.append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string()))
            table = schema.empty_table()
            return table.select(columns) if columns else table
        return ds.to_table(columns=columns, filter=filter)

    def done_ids(self) -> set[str]:
        """Ids a rerun must not render again: every id in the catalog except those that only
        failed for a passing reason (an out-of-memory error, a lost worker). A row that failed
        because the input is bad (`bad_row: …`) or its prompt was blocked (`prompt_blocked: …`)
        stays done: it would fail the same way again."""
        t = self.read(["image_id", "status", "error"])
        done = set()
        for image_id, status, error in zip(*(t.column(c).to_pylist() for c in ("image_id", "status", "error"))):
            if status != "failed" or (error or "").startswith(("bad_row", "prompt_blocked")):
                done.add(image_id)
        return done

    def find(self, image_id: str) -> dict | None:
        rows = self.read(filter=pads.field("image_id") == image_id).to_pylist()
        return rows[-1] if rows else None

    def batch_rows(self, batch_id: str) -> list[dict]:
        return self.read(filter=pads.field("batch_id") == batch_id).to_pylist()
