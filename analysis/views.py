"""A DuckDB connection with the analysis views (analysis/views.sql) over one output location.

The catalog and the review decisions are handed to DuckDB as pyarrow datasets built on the
OutputStore's filesystem, so a local folder and an object-store URI (s3://bucket/prefix) read
the same way and DuckDB needs no httpfs extension.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs

from app.catalog.store import CATALOG_DIR, CatalogStore
from app.review import DECISION_SCHEMA, ReviewStore
from app.storage import OutputStore, StorageError

VIEWS_SQL = Path(__file__).with_name("views.sql")
VIEWS_MARKER = "-- imagefab:views"
IMAGE_FILES_SCHEMA = pa.schema([("image_id", pa.string()), ("bytes", pa.int64())])


def one_row(result: duckdb.DuckDBPyConnection) -> tuple:
    """The single row of an aggregate query (which always has one)."""
    row = result.fetchone()
    if row is None:
        raise AnalysisError("an aggregate query returned no row")
    return row


class AnalysisError(ValueError):
    """Bad input to an analysis command: the message names it and says what would be valid."""


def views_sql() -> str:
    """The part of views.sql that builds on the three sources (catalog, decisions, image files)."""
    text = VIEWS_SQL.read_text()
    return text[text.index(VIEWS_MARKER) :]


def master_sizes(output: OutputStore) -> pa.Table:
    """image_id and size of every master PNG (images/<id[:2]>/<id>.png), from one listing."""
    fs, root = output.fs_and_root
    base = f"{root.rstrip('/')}/images"
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{output.uri_of('images')}: cannot list images ({e})") from e
    ids, sizes = [], []
    for info in infos:
        rel = info.path[len(base) :].strip("/").split("/")
        # masters sit two levels down; variants three (images/ab/<id>/<preset>.<ext>)
        if info.type == pafs.FileType.File and len(rel) == 2 and rel[1].endswith(".png"):
            ids.append(rel[1][: -len(".png")])
            sizes.append(info.size)
    return pa.table([ids, sizes], schema=IMAGE_FILES_SCHEMA)


def connect(
    output: OutputStore | str,
    *,
    file_sizes: bool = False,
    con: duckdb.DuckDBPyConnection | None = None,
    search_index: bool = True,
) -> duckdb.DuckDBPyConnection:
    """A connection whose views read the catalog at `output`.

    file_sizes: list the master PNGs so `images.master_bytes` is filled (one listing of
    images/; the catalog records variant sizes but not the master's).
    search_index: `search_images` reads the persistent index (analysis/search_index.py), first
    brought up to date with the catalog; False keeps the plain macro, which tokenizes per query.
    """
    output = OutputStore.of(output)
    store = CatalogStore(output)
    live = store.live_files()
    if not live:
        raise AnalysisError(
            f"no catalog under {output.uri_of(CATALOG_DIR)}: "
            f"run a job into it first (imagefab run SPEC --output {output.uri})"
        )
    decisions = ReviewStore(output).dataset()
    con = con or duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # timestamps print in UTC, as the catalog stores them
    # The catalog in two parts (CatalogStore.partitioned_files): rows of checked compacted files
    # are the latest of their image unless contested; `catalog_latest` ranks only the rest.
    checked, tail, contested = store.partitioned_files(live)
    # DuckDB's own Parquet reader over the compacted files (on object storage their local copies,
    # app/catalog/cache.py) where it can read them all; else a pyarrow dataset.
    source = store.duckdb_source(checked)
    if source is not None:
        con.execute(f"CREATE OR REPLACE TEMP VIEW catalog_checked_source AS SELECT * FROM {source}")
    else:
        con.register("catalog_checked_source", store.files_dataset(checked))
    con.register("catalog_tail_source", store.files_dataset(tail))
    con.register("catalog_contested_ids", pa.table({"image_id": pa.array(contested, pa.string())}))
    con.execute(
        "CREATE OR REPLACE TEMP VIEW catalog_source AS "
        "SELECT * FROM catalog_checked_source UNION ALL SELECT * FROM catalog_tail_source"
    )
    con.register("decisions_source", decisions if decisions is not None else DECISION_SCHEMA.empty_table())
    con.register("image_files", master_sizes(output) if file_sizes else IMAGE_FILES_SCHEMA.empty_table())
    con.execute(views_sql())
    if not tail and not contested:
        # Every row is in a checked file and no id is contested: each row is its image's latest,
        # and the general form's two passes over the ids (analysis/views.sql) would find nothing.
        con.execute(
            "CREATE OR REPLACE VIEW catalog_latest AS "
            "SELECT * REPLACE (CAST(date AS DATE) AS date) FROM catalog_checked_source"
        )
    else:
        _one_pass_latest(con)
    if search_index:
        from analysis.search_index import SearchIndex

        SearchIndex(output).attach(con, live)
    return con


# The rows that are not their image's latest, found among the few that can be: the rows of the
# other (uncompacted) files and the rows of contested ids (a scan of the image_id column).
SUPERSEDED_SQL = """
CREATE OR REPLACE TEMP TABLE catalog_superseded AS
WITH unsure AS (
    SELECT image_id FROM catalog_tail_source WHERE image_id IS NOT NULL
    UNION SELECT image_id FROM catalog_contested_ids WHERE image_id IS NOT NULL),
candidates AS (
    SELECT image_id, created_at, run_id FROM catalog_checked_source
    WHERE image_id IN (SELECT image_id FROM unsure) OR image_id IS NULL
    UNION ALL SELECT image_id, created_at, run_id FROM catalog_tail_source)
SELECT image_id, created_at, run_id,
       row_number() OVER (PARTITION BY image_id ORDER BY created_at DESC, run_id DESC) AS rank
FROM candidates
"""
# Where the ranked rows are told apart by (image_id, created_at, run_id), `catalog_latest` reads the catalog once and drops the superseded rows by that key; the general
# form of analysis/views.sql reads it twice (the unsure rows, then the rest).
ONE_PASS_LATEST_SQL = """
CREATE OR REPLACE VIEW catalog_latest AS
SELECT * REPLACE (CAST(date AS DATE) AS date) FROM catalog_source c
WHERE NOT EXISTS (SELECT 1 FROM catalog_superseded s
                  WHERE s.rank > 1 AND s.image_id IS NOT DISTINCT FROM c.image_id AND s.created_at IS NOT DISTINCT FROM c.created_at
                    AND s.run_id IS NOT DISTINCT FROM c.run_id)
"""


def _one_pass_latest(con: duckdb.DuckDBPyConnection) -> None:
    """Replace the general `catalog_latest` by its one-pass form when the catalog allows it (the
    same rows: each image's row ranked first is kept, every other row of it dropped)."""
    con.execute(SUPERSEDED_SQL)
    (ties,) = one_row(
        con.execute(
            "SELECT count(*) FROM (SELECT image_id, created_at, run_id FROM catalog_superseded "
            "GROUP BY ALL HAVING count(*) > 1)"
        )
    )
    if not ties:
        con.execute(ONE_PASS_LATEST_SQL)


def resolve_run(con: duckdb.DuckDBPyConnection, run: str | None) -> str | None:
    """A run_id from a full id or an unambiguous part of one (`27e8`, `ecommerce-studio-2026…`)."""
    if not run:
        return None
    runs = [r for (r,) in con.execute("SELECT DISTINCT run_id FROM catalog ORDER BY run_id").fetchall()]
    if run in runs:
        return run
    matches = [r for r in runs if run in r]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AnalysisError(f"no run {run!r} in this catalog; the runs are: {', '.join(runs)}")
    raise AnalysisError(f"{run!r} matches several runs ({', '.join(matches)}): give more of the run_id")
