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
    select = ", ".join("round(score, 4) AS score" if c == "score" else c for c in columns)
    result = con.execute(
        f"SELECT {select} FROM search_images($text, fields := $fields, conjunctive := $all) LIMIT $limit",
        {"text": text, "fields": ",".join(fields) if fields else None, "all": all_terms, "limit": limit},
    )
    rows = result.fetchall()
    return [d[0] for d in result.description], rows
