"""Full-text search over prompts, negative prompts and tags, ranked by BM25.

The ranking is plain SQL (`search_images` in analysis/views.sql), not DuckDB's fts extension:
that is downloaded at run time, which an offline installation cannot do, and its PyPI wheels are
locked to older DuckDB releases. The scores equal fts's `match_bm25` for the same tokens
(tests/test_analysis_search.py checks against values fts computed), and the index is never stale:
it is built from the `images` view per query.
"""

from __future__ import annotations

import duckdb

from analysis.views import AnalysisError, one_row

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
    # on image_id reaches the catalog scan, so only the row groups holding them are read.
    top = con.execute(
        "SELECT image_id, score FROM search_scores($text, fields := $fields, conjunctive := $all, top := $limit) "
        "ORDER BY round(score, 9) DESC, image_id LIMIT $limit",
        {"text": text, "fields": ",".join(fields) if fields else None, "all": all_terms, "limit": limit},
    ).fetchall()
    if not top:
        return list(columns), []
    ids = ", ".join("'" + i.replace("'", "''") + "'" for i, _ in top)
    shown = [c for c in columns if c != "score"]
    result = con.execute(f"SELECT image_id AS _id, {', '.join(shown) or 'NULL'} FROM images WHERE image_id IN ({ids})")
    by_id = {r[0]: r[1:] for r in result.fetchall()}
    names = [d[0] for d in result.description][1:]
    rows = []
    for image_id, score in top:
        values = dict(zip(names, by_id[image_id], strict=True))
        rows.append(tuple(round(score, 4) if c == "score" else values[c] for c in columns))
    return list(columns), rows
