"""Analytics over the image catalog: SQL views, named queries, search, cost, report, review page.

    import analysis
    con = analysis.connect("outputs")            # DuckDB with the views of analysis/views.sql
    con.sql("SELECT outcome, count(*) FROM images GROUP BY ALL")
    analysis.run_query(con, "by_lora", {"lora": "tiny-style", "start": "2026-11-01"})
    analysis.search(con, "red leather boot")

Nothing here imports Ray or torch, and importing the package (as `imagefab` does to register its
commands) loads nothing heavy: DuckDB and the rest load on first use.
"""

from importlib import import_module

_EXPORTS = {
    "AnalysisError": "analysis.views",
    "connect": "analysis.views",
    "resolve_run": "analysis.views",
    "views_sql": "analysis.views",
    "QUERIES": "analysis.queries",
    "run_query": "analysis.queries",
    "search": "analysis.fulltext",
    "cost_report": "analysis.cost",
    "build_report": "analysis.report",
    "write_report": "analysis.report",
}
__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (built from the lazy-export table)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
