"""The analysis and review commands, for app/cli.py to register:

  imagefab query NAME [--param k=v]... [--output URI] [--format table|csv|json] [--limit N] [--offset N]
                 [--all] [--out FILE.parquet|csv|json]
  imagefab query --list
  imagefab sql "SELECT … FROM images" [--output URI] [--format …]
  imagefab search "red leather boot" [--limit N] [--field prompt]... [--all-terms]
  imagefab cost [RUN] [--output URI] [--prices prices.yaml] [--format text|json]
  imagefab cost --month [YYYY-MM] [--output URI] --prices prices.yaml    (spend against monthly budgets)
  imagefab report [RUN] [--output URI] [--out report.html]
  imagefab review list [--output URI] [--run RUN]
  imagefab review approve|reject IMAGE_ID... --by NAME [--note TEXT]
  imagefab review serve [--output URI] [--port 8765] [--by NAME]

Bad input (an unknown query or parameter, SQL that does not bind, no catalog at the output)
prints one `imagefab: error: …` line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date, datetime

EXIT_BAD_INPUT = 2
DEFAULT_OUTPUT = "outputs"
QUERY_PAGE = 100  # rows `imagefab query` prints as a table unless --all or --limit
VIEWS = (
    "images",
    "catalog",
    "decisions",
    "latest_decisions",
    "acceptance_by_template",
    "acceptance_by_variable",
    "acceptance_by_combination",
    "search_images('words')",
)


def _fail(message: str) -> int:
    print(f"imagefab: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(func):
    """Turn the analysis's own errors (and DuckDB's, for user SQL) into one line and exit 2."""

    def run(args: argparse.Namespace) -> int:
        import duckdb

        from analysis.views import AnalysisError
        from app.review import ReviewError
        from app.storage import StorageError

        try:
            return func(args)
        except (AnalysisError, ReviewError, StorageError) as e:
            return _fail(str(e))
        except duckdb.Error as e:
            hint = ""
            if isinstance(e, duckdb.CatalogException):
                hint = f"\n(the views are: {', '.join(VIEWS)})"
            return _fail(f"{str(e).strip()}{hint}")
        except BrokenPipeError:  # `imagefab sql … | head`
            return 0

    run.__name__ = func.__name__
    return run


# ---- output formats


def _cell(v, width: int | None = None) -> str:
    if v is None:
        s = ""
    elif isinstance(v, float):
        s = f"{v:.6g}" if abs(v) < 1e6 else f"{v:.0f}"
    elif isinstance(v, datetime):
        s = v.isoformat(sep=" ", timespec="seconds")
    elif isinstance(v, date):
        s = v.isoformat()
    elif isinstance(v, dict):
        s = ", ".join(f"{k}={x}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        s = ", ".join(_cell(x) for x in v)
    else:
        s = str(v)
    s = " ".join(s.split())
    return s if width is None or len(s) <= width else s[: width - 1] + "…"


def _json_value(v):
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def print_result(columns: list[str], rows: list[tuple], fmt: str, out=None, width: int = 60) -> None:
    out = out or sys.stdout
    if fmt == "json":
        json.dump([{c: _json_value(v) for c, v in zip(columns, r)} for r in rows], out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out)
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in rows])
    else:
        cells = [[_cell(v, width) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
        out.write(line(columns) + "\n" + line(["-" * w for w in widths]) + "\n")
        for r in cells:
            out.write(line(r) + "\n")
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _parse_params(pairs: list[str]) -> dict[str, str]:
    from analysis.views import AnalysisError

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AnalysisError(f"--param takes KEY=VALUE, not {pair!r}")
        params[key.strip()] = value
    return params


def _connect(args, file_sizes: bool = False):
    from analysis.views import connect

    return connect(args.output, file_sizes=file_sizes)


# ---- commands


@_guarded
def cmd_query(args: argparse.Namespace) -> int:
    from analysis.queries import QUERIES, bind, count_query, export_query, get, run_query

    if args.list or not args.name:
        if not args.list:
            return _fail(f"name a query (imagefab query NAME); the queries are: {', '.join(QUERIES)}")
        for q in QUERIES.values():
            usage = " ".join(f"{p.name}=…" if p.required else f"[{p.name}=…]" for p in q.params)
            print(f"{q.name:26s} {q.help}" + (f"\n{'':26s}   params: {usage}" if usage else ""))
        return 0
    query = get(args.name)  # an unknown name fails before the catalog is opened
    params = _parse_params(args.param)
    bind(query, params)  # so do missing or malformed parameters
    if args.all and args.limit is not None:
        return _fail("--all prints every row: give --all or --limit, not both")
    con = _connect(args)
    if args.out:
        n = export_query(con, args.name, args.out, params, limit=args.limit, offset=args.offset)
        print(f"{n} row{'s' if n != 1 else ''} of {args.name} written to {args.out}")
        return 0
    # A table is read by a person: a page unless --all. csv and json are read by programs: every
    # row unless --limit, as before (--out exports a large result much faster).
    limit = args.limit if args.limit is not None or args.all or args.format != "table" else QUERY_PAGE
    columns, rows = run_query(con, args.name, params, limit=limit, offset=args.offset)
    print_result(columns, rows, args.format)
    if limit is not None and len(rows) == limit:
        total = count_query(con, args.name, params)
        if args.offset + len(rows) < total:
            print(
                f"{args.offset + 1}-{args.offset + len(rows)} of {total} rows; next: --offset {args.offset + len(rows)} "
                "(--all prints every row, --out FILE.parquet|csv|json exports them)",
                file=sys.stderr,
            )
    return 0


@_guarded
def cmd_sql(args: argparse.Namespace) -> int:
    con = _connect(args, file_sizes=args.file_sizes)
    result = con.execute(args.sql)
    rows = result.fetchall()
    if result.description is None:
        return 0
    print_result([d[0] for d in result.description], rows, args.format)
    return 0


@_guarded
def cmd_search(args: argparse.Namespace) -> int:
    from analysis.fulltext import search

    con = _connect(args)
    columns, rows = search(con, args.text, limit=args.limit, fields=tuple(args.field), all_terms=args.all_terms)
    print_result(columns, rows, args.format)
    return 0


def _prices(path: str | None):
    from analysis.views import AnalysisError
    from app.cost import PriceTable

    if not path:
        return PriceTable(), "defaults (app/cost.py)"
    try:
        return PriceTable.from_yaml(path), path
    except (OSError, ValueError) as e:
        raise AnalysisError(f"prices: {e}") from e


@_guarded
def cmd_cost(args: argparse.Namespace) -> int:
    from analysis.cost import cost_report
    from analysis.views import resolve_run

    prices, where = _prices(args.prices)
    if args.month is not None:
        return _monthly(args, prices, where)
    con = _connect(args, file_sizes=True)
    report = cost_report(con, prices, resolve_run(con, args.run), prices_from=where)
    if args.format == "json":
        print(json.dumps(_json_value(report.to_dict()), indent=1))
    else:
        print(report.render())
    return 0


def _monthly(args: argparse.Namespace, prices, where: str) -> int:
    """Spend in one month against each of the price table's monthly budgets (app/budget.py)."""
    from analysis.views import AnalysisError
    from app.budget import MonthlyBudgets, current_month, render_spend
    from app.catalog.store import CatalogStore
    from app.storage import OutputStore

    month = args.month or current_month()
    if args.run:
        raise AnalysisError("cost --month covers every run of the month: give no RUN")
    try:
        budgets = MonthlyBudgets.parse(prices.monthly_budgets)
        history = CatalogStore(OutputStore.at(args.output)).read(["tags", "created_at", "cost_usd", "run_id"])
        spend = budgets.spend(history, month)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    if args.format == "json":
        print(json.dumps({"month": month, "prices": where, "budgets": [s.to_dict() for s in spend]}, indent=1))
    else:
        print(render_spend(spend, where))
    return 0


@_guarded
def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    prices, where = _prices(args.prices)
    path = write_report(
        args.output,
        args.out,
        run=args.run,
        prices=prices,
        prices_from=where,
        max_thumbs=args.max_thumbs,
        threshold=args.threshold,
    )
    print(f"report: {path}")
    return 0


@_guarded
def cmd_review(args: argparse.Namespace) -> int:
    from app.review import decide, pending_page

    if args.action == "list":
        con = _connect(args)  # fails clearly where there is no catalog
        from analysis.views import resolve_run

        run = resolve_run(con, args.run)
        total, rows = pending_page(args.output, run=run, limit=args.limit, offset=args.offset)
        if not rows:
            print("no images waiting for review" + (f" in {run}" if run else "") + (" at this offset" if total else ""))
            return 0
        print_result(
            ["image_id", "run_id", "created_at", "reasons", "sharpness", "prompt"],
            [
                (
                    r["image_id"],
                    r["run_id"],
                    r["created_at"],
                    r["reasons"],
                    round(r["sharpness"], 2) if r["sharpness"] is not None else None,
                    r["prompt"],
                )
                for r in rows
            ],
            args.format,
        )
        if args.offset + len(rows) < total:
            print(
                f"{args.offset + 1}-{args.offset + len(rows)} of {total} waiting; "
                f"next: --offset {args.offset + len(rows)}",
                file=sys.stderr,
            )
        return 0
    if args.action == "serve":
        from analysis.review_page import serve

        serve(args.output, port=args.port, reviewer=args.by or "", timeout_s=args.timeout)
        return 0
    decision = {"approve": "approved", "reject": "rejected"}[args.action]
    decided = decide(args.output, args.image_ids, decision, args.by or "", note=args.note or "")
    for d in decided:
        print(f"{d.image_id}: {d.decision} by {d.reviewer} at {d.decided_at.isoformat(timespec='seconds')}")
    return 0


# ---- registration


def _output_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="the output location (folder or URI) holding the catalog")


def _format_arg(p: argparse.ArgumentParser, choices=("table", "csv", "json")) -> None:
    p.add_argument("--format", choices=choices, default=choices[0])


def add_analysis_cli(subparsers) -> None:
    q = subparsers.add_parser("query", help="run a named query over the catalog (--list shows them)")
    q.add_argument("name", nargs="?")
    q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--list", action="store_true", help="list the named queries and their parameters")
    q.add_argument(
        "--limit", type=int, help=f"at most this many rows (default: {QUERY_PAGE} as a table, all as csv or json)"
    )
    q.add_argument("--offset", type=int, default=0, help="skip this many rows first (the next page)")
    q.add_argument("--all", action="store_true", help="print every row (a table shows a page by default)")
    q.add_argument(
        "--out",
        metavar="FILE",
        help="write every row (or the --limit/--offset page) to FILE.parquet, .csv or .json with DuckDB (fast)",
    )
    _output_arg(q)
    _format_arg(q)
    q.set_defaults(func=cmd_query)

    s = subparsers.add_parser("sql", help="run SQL against the analysis views (images, catalog, decisions, …)")
    s.add_argument("sql")
    s.add_argument("--file-sizes", action="store_true", help="list master PNGs to fill images.master_bytes")
    _output_arg(s)
    _format_arg(s)
    s.set_defaults(func=cmd_sql)

    f = subparsers.add_parser("search", help="full-text search over prompts, negative prompts and tags (BM25)")
    f.add_argument("text")
    f.add_argument("--limit", type=int, default=20)
    f.add_argument("--field", action="append", default=[], choices=["prompt", "negative_prompt", "tags"])
    f.add_argument("--all-terms", action="store_true", help="only images containing every word")
    _output_arg(f)
    _format_arg(f)
    f.set_defaults(func=cmd_search)

    c = subparsers.add_parser("cost", help="cost per image, per accepted image, per combination and template")
    c.add_argument("run", nargs="?", help="a run_id (or a unique part of one); default: every run")
    c.add_argument("--prices", help="a prices YAML (keys of app/cost.py PriceTable)")
    c.add_argument(
        "--month",
        nargs="?",
        const="",
        metavar="YYYY-MM",
        help="spend in a month (default: this one) against the price table's monthly_budgets",
    )
    _output_arg(c)
    _format_arg(c, ("text", "json"))
    c.set_defaults(func=cmd_cost)

    r = subparsers.add_parser("report", help="one self-contained HTML page: summary, plots, contact sheets")
    r.add_argument("run", nargs="?", help="a run_id (or a unique part of one); default: every run")
    r.add_argument("--out", default="report.html")
    r.add_argument("--prices", help="a prices YAML (keys of app/cost.py PriceTable)")
    r.add_argument("--max-thumbs", type=int, default=60, help="thumbnails per contact sheet")
    r.add_argument("--threshold", type=float, default=0.5, help="flag templates accepted less often than this")
    _output_arg(r)
    r.set_defaults(func=cmd_report)


def add_review_cli(subparsers) -> None:
    p = subparsers.add_parser("review", help="the review queue: list, approve, reject, or a local page")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="images in review with no decision yet")
    ls.add_argument("--run")
    ls.add_argument("--limit", type=int, default=100, help="images per page (oldest first)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many (the next page)")
    _output_arg(ls)
    _format_arg(ls)
    for action in ("approve", "reject"):
        a = sub.add_parser(action, help=f"{action} images (appends a decision; the latest one wins)")
        a.add_argument("image_ids", nargs="+", metavar="IMAGE_ID")
        a.add_argument("--by", required=True, metavar="NAME", help="who decided")
        a.add_argument("--note", default="")
        _output_arg(a)
    sv = sub.add_parser("serve", help="a local page (127.0.0.1) to approve or reject images in review")
    sv.add_argument("--port", type=int, default=8765)
    sv.add_argument("--by", metavar="NAME", help="the reviewer name filled in on the page")
    sv.add_argument("--timeout", type=float, help="stop after this many seconds")
    _output_arg(sv)
    p.set_defaults(func=cmd_review)
