"""People's decisions on images, and the review queue.

QC flags borderline images `review`; a person approves or rejects them. Decisions are appended
beside the catalog, never written into it:

    <output>/reviews/decisions/date=YYYY-MM-DD/part-<uuid>.parquet    one new file per call

Each call writes a new file through OutputStore (atomic for readers); nothing is rewritten. The
latest decision for an image (by `decided_at`) wins, so a person can change their mind by
deciding again. Readers join decisions on `image_id` (analysis/views.sql, the `images` view).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from app.catalog.store import CatalogStore, sql_string
from app.storage import OutputStore, StorageError

DECISIONS_DIR = "reviews/decisions"
DECISIONS = ("approved", "rejected")
# A person may sign off or take down what QC kept; QC rejects have no variants and failed rows no
# image, so there is nothing there to approve.
DECIDABLE_STATUSES = ("review", "accepted")

DECISION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("decision", pa.string()),  # approved | rejected
        ("reviewer", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
        ("note", pa.string()),
    ]
)


_KEY_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("status", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
    ]
)


class ReviewError(ValueError):
    """A decision that cannot be recorded; the message names the bad value."""


@dataclass(frozen=True)
class Decision:
    image_id: str
    decision: str
    reviewer: str
    decided_at: datetime
    note: str = ""


@dataclass(frozen=True)
class ReviewStore:
    output: OutputStore

    def append(self, decisions: list[Decision]) -> str | None:
        if not decisions:
            return None
        table = pa.Table.from_pylist([d.__dict__ for d in decisions], schema=DECISION_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        day = decisions[0].decided_at.astimezone(UTC).strftime("%Y-%m-%d")
        return self.output.write_bytes(f"{DECISIONS_DIR}/date={day}/part-{uuid.uuid4().hex}.parquet", buf.getvalue())

    def dataset(self) -> pads.Dataset | None:
        """Every decision file, or None when nobody has decided anything yet."""
        fs, root = self.output.fs_and_root
        base = f"{root.rstrip('/')}/{DECISIONS_DIR}"
        try:
            if fs.get_file_info(base).type == pa.fs.FileType.NotFound:
                return None
        except OSError as e:
            raise StorageError(f"{self.output.uri_of(DECISIONS_DIR)}: cannot list decisions ({e})") from e
        part = pads.partitioning(pa.schema([("date", pa.string())]), flavor="hive")
        return pads.dataset(
            base,
            filesystem=fs,
            format="parquet",
            partitioning=part,
            schema=DECISION_SCHEMA.append(pa.field("date", pa.string())),
        )

    def read(self) -> pa.Table:
        ds = self.dataset()
        return DECISION_SCHEMA.empty_table() if ds is None else ds.to_table(columns=DECISION_SCHEMA.names)

    def latest(self) -> dict[str, Decision]:
        """The decision in force for each image: the latest one."""
        rows = sorted(self.read().to_pylist(), key=lambda r: r["decided_at"])
        return {r["image_id"]: Decision(**r) for r in rows}


def _latest_rows(table: pa.Table) -> dict[str, dict]:
    """One catalog row per image_id: the latest (a rerun may append a row for an id that failed)."""
    rows = sorted(table.to_pylist(), key=lambda r: (r["created_at"], r.get("run_id") or ""))
    return {r["image_id"]: r for r in rows}


def decide(
    output: OutputStore | str,
    image_ids: list[str],
    decision: str,
    reviewer: str,
    note: str = "",
    now: datetime | None = None,
) -> list[Decision]:
    """Record one person's decision on some images; all are checked before anything is written."""
    output = OutputStore.of(output)
    if decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a decision needs the reviewer's name (--by NAME)")
    ids = list(dict.fromkeys(i.strip() for i in image_ids if i.strip()))
    if not ids:
        raise ReviewError("no image ids given")
    catalog = CatalogStore(output)
    found = _latest_rows(
        catalog.read(["image_id", "status", "created_at", "run_id"], filter=pads.field("image_id").isin(ids))
    )
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise ReviewError(
            f"unknown image id(s) {', '.join(unknown)}: not in the catalog at {output.uri} "
            "(`imagefab review list` shows the ones waiting)"
        )
    not_decidable = [f"{i} is {found[i]['status']}" for i in ids if found[i]["status"] not in DECIDABLE_STATUSES]
    if not_decidable:
        raise ReviewError(
            f"only images in {' or '.join(DECIDABLE_STATUSES)} can be decided: {'; '.join(not_decidable)}"
        )
    when = now or datetime.now(UTC)
    decisions = [Decision(i, decision, reviewer, when, note or "") for i in ids]
    ReviewStore(output).append(decisions)
    return decisions


def pending_review(output: OutputStore | str, run: str | None = None) -> list[dict]:
    """Catalog rows in `review` with no decision yet, oldest first (optionally of one run)."""
    return pending_page(output, run)[1]


def pending_page(
    output: OutputStore | str, run: str | None = None, limit: int | None = None, offset: int = 0
) -> tuple[int, list[dict]]:
    """(how many images wait for review, the rows of `limit` of them from `offset`), oldest first.

    The queue is chosen from four columns; whole rows are read for the page only, so a page of
    a million-image catalog costs about what the queue's ids do."""
    output = OutputStore.of(output)
    if (limit is not None and limit < 1) or offset < 0:
        raise ReviewError(f"a page needs --limit of at least 1 and --offset of 0 or more, not {limit}, {offset}")
    catalog = CatalogStore(output)
    key = ["image_id", "status", "created_at", "run_id"]
    filt = pads.field("status") == "review"
    if run:
        filt = filt & (pads.field("run_id") == run)
    sure, unsure, candidates, every = _queue_keys(catalog, key, filt, run)
    rows = _latest_rows(candidates)
    if rows:
        # An id in review in one run may have a later row elsewhere (not review): the latest wins.
        others = every.filter(pads.field("image_id").isin(list(rows)) & (pads.field("status") != "review"))
        later = _latest_rows(others)
        rows = {i: r for i, r in rows.items() if i not in later or _newer(r, later[i])}
    queue = pa.concat_tables(
        [sure.filter(pc.invert(unsure)).select(key), pa.Table.from_pylist(list(rows.values()), _KEY_SCHEMA)]
    )
    decided = ReviewStore(output).latest()
    if decided:
        queue = queue.filter(
            pc.invert(pc.is_in(queue.column("image_id"), value_set=pa.array(list(decided), pa.string())))
        )
    end = None if limit is None else offset + limit
    page = (
        queue.sort_by([("created_at", "ascending"), ("image_id", "ascending")])
        .slice(offset, end and end - offset)
        .to_pylist()
    )
    if not page:
        return queue.num_rows, []
    wanted = {(r["image_id"], r["created_at"], r["run_id"]) for r in page}
    # Only the partitions holding the page's rows are read (the ids of a page are in every file).
    in_page = pads.field("image_id").isin([r["image_id"] for r in page])
    runs = {f"run_id={r['run_id']}" for r in page}

    def page_rows() -> pa.Table:
        # Only the files of those partitions are opened: footers of the rest are not read again.
        files = [f for f in catalog.live_files() if f.rsplit("/", 2)[-2] in runs]
        return catalog.files_dataset(files).to_table(filter=in_page & filt) if files else pa.table({})

    full = catalog.reading(page_rows).to_pylist()
    by_key = {(r["image_id"], r["created_at"], r["run_id"]): r for r in full}
    return queue.num_rows, [by_key[k] for k in sorted(wanted, key=lambda k: (k[1], k[0]))]


def _queue_keys(
    catalog: CatalogStore, key: list[str], filt: pads.Expression, run: str | None = None
) -> tuple[pa.Table, pa.Array, pa.Table, pa.Table]:
    """The key columns of the rows in review matching `filt` (of `run`, when given): (rows of
    checked compacted files, which of them are unsure, the rows to rank with the rest of their
    image: unsure ones and those of uncompacted files, and the key columns of the live rows of
    those candidates' ids (all of them where pyarrow scans): whether a queued id has a later row
    elsewhere). Where DuckDB can read
    the compacted files itself (local, or cached copies in today's schema), it reads only the rows
    in review and then only the candidates' rows: a million-row catalog is not materialised. A
    compaction deleting a file just listed makes it list again."""

    def once() -> tuple[pa.Table, pa.Array, pa.Table, pa.Table]:
        checked, tail, contested = catalog.partitioned_files(catalog.live_files())
        late: pa.Table = catalog.files_dataset(tail).to_table(columns=key) if tail else _KEY_SCHEMA.empty_table()
        source = catalog.duckdb_source(checked)
        con = None
        if source is not None:
            import duckdb  # lazily: app/ outside the Serve app loads DuckDB only where it reads with it

            con = duckdb.connect()
            where = "status = 'review'" + (f" AND run_id = {sql_string(run)}" if run else "")
            sure = con.sql(f"SELECT {', '.join(key)} FROM {source} WHERE {where}").to_arrow_table()
            sure = sure.cast(_KEY_SCHEMA)
            compacted = None
        else:
            compacted = catalog.files_dataset(checked).to_table(columns=key) if checked else _KEY_SCHEMA.empty_table()
            sure = compacted.filter(filt)
        # Rows of checked compacted files (CatalogStore.partitioned_files) are their image's latest
        # unless the id is contested or also in an uncompacted file: only those are ranked.
        unsure_ids = pa.concat_arrays([pa.array(contested, pa.string()), *late.column("image_id").chunks])
        unsure = pc.is_in(sure.column("image_id"), value_set=unsure_ids)
        candidates = pa.concat_tables([sure.filter(unsure), late.filter(filt)])
        ids = pc.unique(candidates.column("image_id").combine_chunks())
        if con is not None:
            con.register("candidate_ids", pa.table({"image_id": ids}))
            theirs = con.sql(
                f"SELECT {', '.join(key)} FROM {source} WHERE status <> 'review' "
                "AND image_id IN (SELECT image_id FROM candidate_ids)"
            ).to_arrow_table()
            con.close()
            every = pa.concat_tables([theirs.cast(_KEY_SCHEMA), late.filter(pc.is_in(late.column("image_id"), ids))])
        else:
            every = pa.concat_tables([compacted, late])
        return sure, unsure, candidates, every

    return catalog.reading(once)


def _newer(a: dict, b: dict) -> bool:
    """Row a is the latest of the two, by the order the views use (created_at, then run_id)."""
    return (a["created_at"], a.get("run_id") or "") >= (b["created_at"], b.get("run_id") or "")
