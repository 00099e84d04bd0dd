"""The full-text search index, kept with the catalog and brought up to date incrementally.

Today's ranking (`search_images` in analysis/views.sql: BM25 over the `images` view, fts's
`match_bm25` scores) tokenizes every prompt on every query: about 3.5 s per 100,000 images.
This index stores the tokens once, beside the catalog:

    <output>/indexes/search/manifest.json            format, segments, and the catalog files they cover
    <output>/indexes/search/<segment>.docs.parquet   one row per catalog row: doc_key, image_id,
                                                     created_at, run_id, file_id, len (tokens);
                                                     sorted by doc_key, small row groups
    <output>/indexes/search/<segment>.postings.parquet  one row per term and doc: term, doc_key,
                                                     len, tf_prompt, tf_negative_prompt, tf_tags;
                                                     sorted by term

A segment covers a set of catalog files (CatalogStore.live_files). `attach` (analysis.connect
calls it) indexes the live files no segment covers yet — a run's new batches, a compacted file —
writes them as a new segment and the manifest, and registers the index with the connection;
files that compaction replaced simply drop out of the manifest, and their rows out of every query.
When segments pile up (or hold mostly replaced files) they are merged into one. The manifest is
written last and whole, so a reader sees an old or a new index, never half of one; a reader whose
output cannot be written still searches, with the new files indexed in memory.

The query (`SEARCH_SQL`) computes exactly what the plain macro does: the latest row per image
(created_at, then run_id), N and the mean length over those, df per query term, BM25 per field
filter; only the postings of the query's terms are read, and scored from the postings alone (each
carries its document's length). `search_best_docs(..., top := N)` keeps only the doc_keys that can
be on the first N rows; `analysis.search` then reads the image_ids of those few from the docs. An
index written in an older format (no `format` in its manifest) is built again on attach. Rows of compacted files that compaction
checked for one row per image are taken as the latest without ranking them (`DEAD_DOCS_SQL`), so a
search over a compacted catalog reads no image_id beyond those of its matches.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from app.catalog import cache as catalog_cache
from app.catalog.schema import CATALOG_SCHEMA, conform
from app.catalog.store import CatalogStore
from app.storage import OutputStore, StorageError

INDEX_DIR = "indexes/search"
MAX_SEGMENTS = 8  # more than this, or more replaced rows than live ones: merge into one
ROW_GROUP_ROWS = 200_000
FIELDS = ("prompt", "negative_prompt", "tags")
DOCS_SCHEMA = pa.schema(
    [
        ("doc_key", pa.int64()),
        ("image_id", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("file_id", pa.int64()),
        ("len", pa.int64()),
    ]
)
# One row per term and document: the document's length (tokens over every field) and the term's
# count in each field, so a search scores from the postings alone (no join with the docs).
POSTINGS_SCHEMA = pa.schema(
    [
        ("term", pa.string()),
        ("doc_key", pa.int64()),
        ("len", pa.int32()),
        ("tf_prompt", pa.int32()),
        ("tf_negative_prompt", pa.int32()),
        ("tf_tags", pa.int32()),
    ]
)
FORMAT = 2  # the manifest's "format": an index written in another format is rebuilt
DOCS_ROW_GROUP_ROWS = 16_384  # the page's doc_keys are looked up in a few row groups by their zone maps
KEY_BITS = 24  # doc_key = file_id << 24 | row within the file (a file holds < 16M rows)

# Rows that are not their image's latest (`search_dead_docs`): only rows of files not checked by
# compaction, and rows of ids they or compaction's manifests contest, need ranking (see
# CatalogStore.partitioned_files); every other row of a checked file is its image's only one.
# Found once when the index is attached (a table: the connection's segments and files are fixed
# then), with the corpus statistics BM25 needs (`search_stats`), not again by every search.
DEAD_DOCS_SQL = """
CREATE OR REPLACE TEMP TABLE search_dead_docs AS
WITH rest AS MATERIALIZED (
    SELECT doc_key, image_id, created_at, run_id, len FROM search_docs
    WHERE file_id IN (SELECT file_id FROM search_rest_files)
       OR image_id IN (SELECT image_id FROM search_contested)
       OR image_id IN (SELECT image_id FROM search_docs WHERE file_id IN (SELECT file_id FROM search_rest_files))
       OR image_id IS NULL)
SELECT doc_key, len FROM rest
WHERE doc_key NOT IN (SELECT arg_max(doc_key, {'t': created_at, 'r': run_id}) FROM rest GROUP BY image_id)
"""
NO_DEAD_DOCS_SQL = """
CREATE OR REPLACE TEMP TABLE search_dead_docs (doc_key BIGINT, len BIGINT)
"""
STATS_SQL = """
CREATE OR REPLACE TEMP TABLE search_stats AS
SELECT n, total / n AS avgdl
FROM (SELECT count(*) - (SELECT count(*) FROM search_dead_docs) AS n,
             sum(len) - (SELECT coalesce(sum(len), 0) FROM search_dead_docs) AS total FROM search_docs)
"""

SEARCH_SQL = """
CREATE OR REPLACE MACRO search_best_docs(query_string, fields := NULL, conjunctive := false, k := 1.2, b := 0.75,
                                         top := NULL) AS TABLE
WITH q AS (SELECT DISTINCT unnest(imagefab_tokens(query_string)) AS term),
wanted AS (SELECT list_transform(string_split(replace(fields, ' ', ''), ','),
                                 lambda f: list_position(['prompt', 'negative_prompt', 'tags'], f) - 1) AS ids),
stats AS (SELECT n, avgdl FROM search_stats),
-- the postings of the query's terms in each image's latest row (one doc_key per image, one row per
-- term and doc_key): df counts every field, tf only the searched ones (null: none of them)
pt AS MATERIALIZED (
    SELECT doc_key, list_position((SELECT list(term) FROM q), term) AS tid, len,
           nullif(CASE WHEN fields IS NULL OR list_contains((SELECT ids FROM wanted), 0) THEN tf_prompt ELSE 0 END
                  + CASE WHEN fields IS NULL OR list_contains((SELECT ids FROM wanted), 1)
                         THEN tf_negative_prompt ELSE 0 END
                  + CASE WHEN fields IS NULL OR list_contains((SELECT ids FROM wanted), 2) THEN tf_tags ELSE 0 END,
                  0) AS tf
    FROM search_postings
    WHERE term IN (SELECT term FROM q) AND doc_key NOT IN (SELECT doc_key FROM search_dead_docs)),
idf AS (SELECT tid, log((stats.n - df + 0.5) / (df + 0.5) + 1) AS idf
        FROM (SELECT tid, count(*) AS df FROM pt GROUP BY tid), stats),
scores AS MATERIALIZED (
    SELECT doc_key, score, round(score, 9) AS r FROM (
        SELECT pt.doc_key,
               sum(idf.idf * (pt.tf * (k + 1) / (pt.tf + k * (1 - b + b * pt.len / stats.avgdl)))) AS score
        FROM pt JOIN idf USING (tid), stats
        WHERE pt.tf IS NOT NULL
        GROUP BY pt.doc_key
        HAVING NOT conjunctive OR count(*) = (SELECT count(*) FROM q))),
-- top := N: only what the first N rows of the ordering can hold (every score tied with the N-th)
cut AS (SELECT min(r) AS r FROM (SELECT r FROM scores ORDER BY r DESC LIMIT coalesce(top, 1)))
SELECT doc_key, score FROM scores WHERE top IS NULL OR r >= (SELECT r FROM cut);

CREATE OR REPLACE MACRO search_images(query_string, fields := NULL, conjunctive := false, k := 1.2, b := 0.75,
                                      top := NULL) AS TABLE
WITH ranked AS (
    SELECT d.image_id, s.score
    FROM search_best_docs(query_string, fields := fields, conjunctive := conjunctive, k := k, b := b, top := top) s
    JOIN search_docs d USING (doc_key))
SELECT i.*, s.score FROM ranked s JOIN images i USING (image_id)
ORDER BY round(s.score, 9) DESC, i.image_id;

-- The same scores without the `images` columns: the ranking needs none of the catalog's rows.
CREATE OR REPLACE MACRO search_scores(query_string, fields := NULL, conjunctive := false, k := 1.2, b := 0.75,
                                      top := NULL) AS TABLE
SELECT d.image_id, s.score
FROM search_best_docs(query_string, fields := fields, conjunctive := conjunctive, k := k, b := b, top := top) s
JOIN search_docs d USING (doc_key)
ORDER BY round(s.score, 9) DESC, d.image_id;
"""

# Tokens of one batch of catalog rows (the macros of views.sql must be defined on `con`).
_TOKENIZE_SQL = """
WITH tokens AS (
    SELECT term, doc_key, field, count(*) AS tf FROM (
        SELECT doc_key, 0::TINYINT AS field, unnest(imagefab_tokens(prompt)) AS term FROM rows
        UNION ALL SELECT doc_key, 1::TINYINT, unnest(imagefab_tokens(negative_prompt)) FROM rows
        UNION ALL SELECT doc_key, 2::TINYINT, unnest(imagefab_tokens(array_to_string(map_values(tags), ' '))) FROM rows)
    GROUP BY ALL),
lens AS (SELECT doc_key, sum(tf) AS len FROM tokens GROUP BY doc_key)
SELECT term, doc_key, any_value(len) AS len,
       coalesce(sum(tf) FILTER (field = 0), 0) AS tf_prompt,
       coalesce(sum(tf) FILTER (field = 1), 0) AS tf_negative_prompt,
       coalesce(sum(tf) FILTER (field = 2), 0) AS tf_tags
FROM tokens JOIN lens USING (doc_key)
GROUP BY term, doc_key ORDER BY term, doc_key
"""


class SearchIndex:
    def __init__(self, output: OutputStore):
        self.output = output
        self.store = CatalogStore(output)

    # -- the manifest ---------------------------------------------------------------------------
    def _manifest(self) -> dict:
        try:
            return json.loads(self.output.read_bytes(f"{INDEX_DIR}/manifest.json"))
        except StorageError:
            return {"format": FORMAT, "segments": [], "files": {}, "next_file_id": 1}
        except ValueError as e:
            raise StorageError(f"{self.output.uri_of(INDEX_DIR)}/manifest.json: not a search index ({e})") from e

    def _rel(self, path: str) -> str:
        return path[len(self.store.base) + 1 :]

    # -- building -------------------------------------------------------------------------------
    def _tokenize(self, con: duckdb.DuckDBPyConnection, files: dict[str, int]) -> tuple[pa.Table, pa.Table]:
        """docs and postings of the catalog files {relative path: file_id}."""
        fs, _ = self.output.fs_and_root
        part = pads.partitioning(pa.schema([("date", pa.string()), ("run_id", pa.string())]), flavor="hive")
        paths = {f"{self.store.base}/{rel}": fid for rel, fid in files.items()}
        ds = pads.dataset(
            list(paths),
            filesystem=fs,
            format="parquet",
            partitioning=part,
            partition_base_dir=self.store.base,
            schema=CATALOG_SCHEMA.append(pa.field("date", pa.string())).append(pa.field("run_id", pa.string())),
        )
        tables = []
        for fragment in ds.get_fragments():
            fid = paths[fragment.path]
            wanted = ["image_id", "created_at", "run_id", "prompt", "negative_prompt", "tags"]
            try:
                t = fragment.to_table(schema=ds.schema, columns=wanted)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # an older release's types
                whole = conform(pq.read_table(fragment.path, filesystem=fs, partitioning=None), fragment.path)
                run_id = fragment.path[len(self.store.base) + 1 :].split("/")[1].split("=", 1)[1]
                whole = whole.append_column("run_id", pa.array([run_id] * whole.num_rows, pa.string()))
                t = whole.select(wanted)
            keys = pa.array([(fid << KEY_BITS) + i for i in range(t.num_rows)], pa.int64())
            tables.append(
                t.append_column("doc_key", keys).append_column("file_id", pa.array([fid] * t.num_rows, pa.int64()))
            )
        if not tables:
            return DOCS_SCHEMA.empty_table(), POSTINGS_SCHEMA.empty_table()
        cur = con.cursor()
        cur.register("rows", pa.concat_tables(tables))
        postings = cur.sql(_TOKENIZE_SQL).to_arrow_table().cast(POSTINGS_SCHEMA)
        cur.register("postings", postings)
        docs = (
            cur.sql(
                "SELECT r.doc_key, r.image_id, r.created_at, r.run_id, r.file_id, coalesce(l.len, 0) AS len "
                "FROM rows r LEFT JOIN (SELECT doc_key, any_value(len) AS len FROM postings GROUP BY doc_key) l "
                "USING (doc_key) ORDER BY doc_key"
            )
            .to_arrow_table()
            .cast(DOCS_SCHEMA)
        )
        cur.close()
        return docs, postings

    def _write_segment(self, docs: pa.Table, postings: pa.Table) -> str:
        import io

        name = f"seg-{uuid.uuid4().hex[:16]}"
        for suffix, table, group in (
            ("docs", docs.sort_by([("doc_key", "ascending")]), DOCS_ROW_GROUP_ROWS),
            ("postings", postings.sort_by([("term", "ascending"), ("doc_key", "ascending")]), ROW_GROUP_ROWS),
        ):
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd", row_group_size=group)
            self.output.write_bytes(f"{INDEX_DIR}/{name}.{suffix}.parquet", buf.getvalue())
        return name

    def _segment_paths(self, names: list[str], suffix: str) -> list[str]:
        return [self.output.path(f"{INDEX_DIR}/{n}.{suffix}.parquet") for n in names]

    def _cached_segments(self, segments: list[str]) -> dict[str, str]:
        """Local copies {store path: local path} of the segments of an index on object storage
        (app/catalog/cache.py: a segment is written once under a new name, never rewritten);
        {} when the cache is off or a segment cannot be fetched (read from the store instead)."""
        fs, _ = self.output.fs_and_root
        paths = [*self._segment_paths(segments, "docs"), *self._segment_paths(segments, "postings")]
        try:
            infos = fs.get_file_info(paths)
            if any(i.type != pafs.FileType.File for i in infos):
                return {}
            got = catalog_cache.local_copies(fs, {i.path: (i.size or 0, i.mtime_ns or 0) for i in infos})
        except OSError:
            return {}
        return got if len(got) == len(paths) else {}

    def attach(self, con: duckdb.DuckDBPyConnection, live: list[str], persist: bool = True) -> None:
        """Bring the index up to date with the `live` catalog files and define `search_images`
        on `con` over it. The macros of views.sql must already be defined on `con`."""
        manifest = self._manifest()
        stale: list[str] = []
        if manifest.get("format") != FORMAT:  # written in another format: index every file again
            stale = list(manifest["segments"])
            manifest = {"segments": [], "files": {}, "next_file_id": manifest["next_file_id"]}
        live_rel = {self._rel(p) for p in live}
        known: dict[str, int] = {f: i for f, i in manifest["files"].items() if f in live_rel}
        new = sorted(live_rel - set(known))
        next_id = int(manifest["next_file_id"])
        new_ids = {f: next_id + i for i, f in enumerate(new)}
        segments = list(manifest["segments"])
        held: dict[str, list[int]] = manifest.get("segment_files", {})
        mem_docs, mem_postings = DOCS_SCHEMA.empty_table(), POSTINGS_SCHEMA.empty_table()
        if new:
            mem_docs, mem_postings = self._tokenize(con, new_ids)
        changed = bool(new) or len(known) != len(manifest["files"]) or bool(stale)
        if persist and changed:
            with contextlib.suppress(StorageError):  # a read-only output: indexed in memory for this connection
                segments, held, mem_docs, mem_postings = self._persist(
                    manifest, segments, known, new_ids, mem_docs, mem_postings
                )
                self._delete_segments(stale)
        ids = pa.table({"file_id": pa.array(sorted([*known.values(), *new_ids.values()]), pa.int64())})
        con.register("search_live_files", ids)
        con.register("search_new_docs", mem_docs)
        con.register("search_new_postings", mem_postings)
        docs_src = "SELECT * FROM search_new_docs"
        post_src = "SELECT * FROM search_new_postings"
        if segments:
            docs_list = ", ".join(f"'{p}'" for p in self._segment_paths(segments, "docs"))
            post_list = ", ".join(f"'{p}'" for p in self._segment_paths(segments, "postings"))
            cached = {} if self.output.is_local else self._cached_segments(segments)
            if cached:  # object storage: segments never change under their name, read local copies
                docs_list = ", ".join(f"'{cached[p]}'" for p in self._segment_paths(segments, "docs"))
                post_list = ", ".join(f"'{cached[p]}'" for p in self._segment_paths(segments, "postings"))
            if self.output.is_local or cached:
                docs_src += f" UNION ALL SELECT * FROM read_parquet([{docs_list}])"
                post_src += f" UNION ALL SELECT * FROM read_parquet([{post_list}])"
            else:  # object storage: pyarrow reads it (DuckDB has no httpfs here)
                fs, _ = self.output.fs_and_root
                con.register("search_seg_docs", pads.dataset(self._segment_paths(segments, "docs"), filesystem=fs))
                con.register(
                    "search_seg_postings", pads.dataset(self._segment_paths(segments, "postings"), filesystem=fs)
                )
                docs_src += " UNION ALL SELECT * FROM search_seg_docs"
                post_src += " UNION ALL SELECT * FROM search_seg_postings"
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW search_docs AS SELECT * FROM ({docs_src}) "
            "WHERE file_id IN (SELECT file_id FROM search_live_files)"
        )
        # Postings of files that compaction replaced stay in their segment until it is merged:
        # where a segment holds any (the manifest names each segment's files), a search reads only
        # the postings of live files.
        live_ids = {*known.values(), *new_ids.values()}
        if all(s in held for s in segments):
            replaced = any(f not in live_ids for s in segments for f in held[s])
        else:
            (replaced,) = con.execute(
                f"SELECT count(*) FROM ({docs_src}) WHERE file_id NOT IN (SELECT file_id FROM search_live_files)"
            ).fetchone() or (0,)
        live_only = f" WHERE doc_key >> {KEY_BITS} IN (SELECT file_id FROM search_live_files)" if replaced else ""
        con.execute(f"CREATE OR REPLACE TEMP VIEW search_postings AS SELECT * FROM ({post_src}){live_only}")
        checked, _, contested = self.store.partitioned_files(live)
        checked_rel = {self._rel(p) for p in checked}
        file_ids = {**known, **new_ids}
        rest = [fid for f, fid in file_ids.items() if f not in checked_rel]
        con.register("search_rest_files", pa.table({"file_id": pa.array(sorted(rest), pa.int64())}))
        con.register("search_contested", pa.table({"image_id": pa.array(contested, pa.string())}))
        con.execute(DEAD_DOCS_SQL if rest or contested else NO_DEAD_DOCS_SQL)
        con.execute(STATS_SQL)
        con.execute(SEARCH_SQL)

    def _persist(
        self,
        manifest: dict,
        segments: list[str],
        known: dict[str, int],
        new_ids: dict[str, int],
        docs: pa.Table,
        postings: pa.Table,
    ) -> tuple[list[str], dict[str, list[int]], pa.Table, pa.Table]:
        """Write the new rows as a segment (or merge all into one), then the manifest, then
        delete the segments the manifest no longer names. Returns the segments and the file ids
        each holds rows of."""
        old_segments = list(segments)
        held = {s: list(f) for s, f in manifest.get("segment_files", {}).items() if s in segments}
        dead = len(manifest["files"]) - len(known)
        if len(segments) + 1 > MAX_SEGMENTS or dead > len(known) + len(new_ids):
            # merge: every segment's live rows and the new ones become one segment
            live_ids = list(known.values())
            if segments:
                fs, _ = self.output.fs_and_root
                seg_docs = pads.dataset(self._segment_paths(segments, "docs"), filesystem=fs).to_table(
                    filter=pads.field("file_id").isin(live_ids)
                )
                keep = set(seg_docs.column("doc_key").to_pylist())
                seg_post = pads.dataset(self._segment_paths(segments, "postings"), filesystem=fs).to_table()
                seg_post = seg_post.filter(
                    pa.compute.is_in(seg_post.column("doc_key"), pa.array(list(keep), pa.int64()))
                )
                docs = pa.concat_tables([seg_docs.cast(DOCS_SCHEMA), docs])
                postings = pa.concat_tables([seg_post.cast(POSTINGS_SCHEMA), postings])
            segments, held = [], {}
        if docs.num_rows or postings.num_rows:
            name = self._write_segment(docs, postings)
            segments = [*segments, name]
            held[name] = sorted(set(docs.column("file_id").to_pylist()))
        files = {**known, **new_ids}
        next_id = max([int(manifest["next_file_id"]) - 1, *new_ids.values()]) + 1
        segment_files = {s: held[s] for s in segments if s in held}
        body = {
            "format": FORMAT,
            "segments": segments,
            "files": files,
            "segment_files": segment_files,
            "next_file_id": next_id,
        }
        self.output.write_bytes(f"{INDEX_DIR}/manifest.json", json.dumps(body).encode())
        self._delete_segments(sorted(set(old_segments) - set(segments)))
        return segments, segment_files, DOCS_SCHEMA.empty_table(), POSTINGS_SCHEMA.empty_table()

    def _delete_segments(self, names: list[str]) -> None:
        fs, _ = self.output.fs_and_root
        for name in names:
            for path in (*self._segment_paths([name], "docs"), *self._segment_paths([name], "postings")):
                with contextlib.suppress(OSError):
                    fs.delete_file(path)
