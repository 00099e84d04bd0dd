"""Full-text search over prompts, negative prompts and tags, ranked by BM25.

The ranking is plain SQL (`search_images` in analysis/views.sql), not DuckDB's fts extension:
that is downloaded at run time, which an offline installation cannot do, and its PyPI wheels are
locked to older DuckDB releases. The scores equal fts's `match_bm25` for the same tokens
(tests/test_analysis_search.py checks against values fts computed). `analysis.connect` reads a
persistent index kept up to date with the catalog (analysis/search_index.py); without it the
plain macro tokenizes the `images` view per query.
"""

from __future__ import annotations

import duckdb

from analysis.views import AnalysisError, one_row
from app.catalog.store import sql_string

FIELDS = ("prompt", "negative_prompt", "tags")
SHOWN = ("score", "image_id", "run_id", "outcome", "prompt", "tags", "uri")


def search(
    con: duckdb.DuckDBPyConnection,
    text: str,
    *,
    limit: int = 20,
    fields: tuple[str, ...] = (),
    all_terms: bool = False,
    columns: tuple[str, ...] = SHOWN,
):
    """Images matching `text`, best first: (column names, rows).

    fields: search only these of prompt / negative_prompt / tags (default: all three).
    all_terms: only images that contain every query term.
    """
    if not text or not text.strip():
        raise AnalysisError('nothing to search for: give some words, e.g. imagefab search "leather boot"')
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise AnalysisError(f"cannot search field(s) {', '.join(bad)}; the fields are {', '.join(FIELDS)}")
    if limit < 1:
        raise AnalysisError(f"--limit must be at least 1, not {limit}")
    (terms,) = one_row(con.execute("SELECT imagefab_tokens($text)", {"text": text}))
    if not terms:
        raise AnalysisError(f"{text!r} has no searchable words (letters or digits)")
    # The best `limit` ids first (the index answers from postings alone), then their rows: a filter
    # on image_id reaches the catalog scan, so only the row groups holding them are read; the index
    # also knows each one's run, so only those runs' partitions are opened.
    args = {"text": text, "fields": ",".join(fields) if fields else None, "all": all_terms, "limit": limit}
    runs: set[str] | None = None
    if _indexed(con):
        top, runs = _best_from_index(con, args)
    else:
        top = con.execute(
            "SELECT image_id, score FROM search_scores($text, fields := $fields, conjunctive := $all, top := $limit) "
            "ORDER BY round(score, 9) DESC, image_id LIMIT $limit",
            args,
        ).fetchall()
    if not top:
        return list(columns), []
    ids = ", ".join(sql_string(i) for i, _ in top)
    in_runs = f" AND run_id IN ({', '.join(sql_string(r) for r in sorted(runs))})" if runs else ""
    shown = [c for c in columns if c != "score"]
    result = con.execute(
        f"SELECT image_id AS _id, {', '.join(shown) or 'NULL'} FROM images WHERE image_id IN ({ids}){in_runs}"
    )
    by_id = {r[0]: r[1:] for r in result.fetchall()}
    names = [d[0] for d in result.description][1:]
    rows = []
    for image_id, score in top:
        values = dict(zip(names, by_id[image_id], strict=True))
        rows.append(tuple(round(score, 4) if c == "score" else values[c] for c in columns))
    return list(columns), rows


def _indexed(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether `con` searches the persistent index (analysis/search_index.py)."""
    (n,) = one_row(con.execute("SELECT count(*) FROM duckdb_functions() WHERE function_name = 'search_best_docs'"))
    return bool(n)


def _best_from_index(con: duckdb.DuckDBPyConnection, args: dict) -> tuple[list[tuple[str, float]], set[str] | None]:
    """The first `limit` (image_id, score) of the ranking and the runs of their rows (each doc is
    its image's latest row; None where a run is unknown): the index scores its postings and keeps
    what can be on the page (doc_keys tied with the last included), then the image_ids of those
    few doc_keys are read, the docs' row groups chosen by their zone maps on doc_key."""
    best = con.execute(
        "SELECT doc_key, score FROM search_best_docs($text, fields := $fields, conjunctive := $all, top := $limit)",
        args,
    ).fetchall()
    if not best:
        return [], None
    keys = ", ".join(str(int(k)) for k, _ in best)
    docs = {
        k: (i, r)
        for k, i, r in con.execute(
            f"SELECT doc_key, image_id, run_id FROM search_docs WHERE doc_key IN ({keys})"
        ).fetchall()
    }
    top = con.execute(
        "SELECT image_id, score FROM (SELECT unnest($ids) AS image_id, unnest($scores) AS score) "
        "ORDER BY round(score, 9) DESC, image_id LIMIT $limit",
        {"ids": [docs[k][0] for k, _ in best], "scores": [s for _, s in best], "limit": args["limit"]},
    ).fetchall()
    run_of = {i: r for i, r in docs.values()}
    runs = {run_of[i] for i, _ in top}
    return top, None if None in runs else runs
