"""Named queries over the analysis views, with typed parameters.

`imagefab query NAME --param k=v` runs one; `imagefab query --list` lists them. Each is plain SQL
against the views in analysis/views.sql, with `$name` parameters bound by DuckDB (never pasted
into the text), so the same SQL can be copied into the DuckDB CLI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

import duckdb

from analysis.views import AnalysisError
from app.catalog.store import sql_string

_ACCEPTANCE = """
       count(*) AS images,
       count(*) FILTER (outcome = 'accepted') AS accepted,
       count(*) FILTER (outcome = 'review') AS review,
       count(*) FILTER (outcome = 'rejected') AS rejected,
       count(*) FILTER (outcome = 'failed') AS failed,
       round(count(*) FILTER (outcome = 'accepted') / nullif(count(*) FILTER (outcome <> 'failed'), 0), 4)
           AS acceptance_rate"""
_COST = """
       count(*) AS images,
       count(*) FILTER (outcome = 'accepted') AS accepted,
       round(sum(gpu_seconds), 3) AS gpu_s,
       round(sum(cpu_seconds), 3) AS cpu_s,
       round(sum(cost_usd), 6) AS cost_usd,
       round(sum(cost_usd) / nullif(count(*) FILTER (outcome <> 'failed'), 0), 8) AS usd_per_image,
       round(sum(cost_usd) / nullif(count(*) FILTER (outcome = 'accepted'), 0), 8) AS usd_per_accepted"""


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # text | date | month | number | integer
    help: str
    required: bool = False
    default: object = None


@dataclass(frozen=True)
class Query:
    name: str
    help: str
    sql: str
    params: tuple[Param, ...] = ()


def _q(name: str, help: str, sql: str, *params: Param) -> Query:
    return Query(name, help, sql.strip(), params)


_RUN = Param("run", "text", "only this run_id")
QUERIES: dict[str, Query] = {
    q.name: q
    for q in (
        _q(
            "runs",
            "per run: images by outcome, device and CPU seconds, cost",
            f"""
SELECT run_id, min(date) AS date, {_ACCEPTANCE},
       round(sum(gpu_seconds), 3) AS gpu_s, round(sum(cpu_seconds), 3) AS cpu_s,
       round(sum(cost_usd), 6) AS cost_usd, min(created_at) AS first_at, max(created_at) AS last_at
FROM images GROUP BY run_id ORDER BY first_at""",
        ),
        _q(
            "outcomes",
            "images by outcome (QC status after people's decisions)",
            """
SELECT outcome, status, approval, count(*) AS images
FROM images WHERE $run IS NULL OR run_id = $run GROUP BY ALL ORDER BY images DESC, outcome""",
            _RUN,
        ),
        _q(
            "by_lora",
            "images generated with a LoRA (optionally one version) in a date range",
            """
SELECT image_id, run_id, created_at, l.version AS lora_version, l.weight AS lora_weight,
       model_stack, outcome, prompt, uri
FROM (
    -- The images with the LoRA are found on the list column first; only their matching entries are
    -- unnested (a lateral unnest of every image's list reads every column of every image).
    SELECT image_id, run_id, created_at, model_stack, outcome, prompt, uri,
           unnest(list_filter(loras, lambda l: l.name = $lora AND ($version IS NULL OR l.version = $version))) AS l
    FROM images
    WHERE list_contains(list_transform(loras, lambda l: l.name), $lora)
      AND ($start IS NULL OR CAST(created_at AS DATE) >= $start)
      AND ($end IS NULL OR CAST(created_at AS DATE) <= $end))
ORDER BY created_at, image_id""",
            Param("lora", "text", "LoRA name, as in the model catalog", required=True),
            Param("version", "text", "LoRA version"),
            Param("start", "date", "first day, YYYY-MM-DD (UTC, inclusive)"),
            Param("end", "date", "last day, YYYY-MM-DD (UTC, inclusive)"),
        ),
        _q(
            "rejected_by_reason",
            "images rejected (by QC or a person) that carry a QC reason",
            """
SELECT image_id, run_id, created_at, status, approval, reasons, reviewer, review_note,
       round(sharpness, 2) AS sharpness, round(contrast, 4) AS contrast, round(exposure, 4) AS exposure, prompt
FROM images WHERE outcome = 'rejected' AND list_contains(reasons, $reason)
ORDER BY created_at, image_id""",
            Param("reason", "text", "a QC reason: blur, low_contrast, borderline_blur, …", required=True),
        ),
        _q(
            "reasons",
            "QC reasons and how often each led to each outcome",
            """
SELECT reason, outcome, count(*) AS images
FROM (SELECT outcome, unnest(reasons) AS reason FROM images)
GROUP BY ALL ORDER BY images DESC, reason, outcome""",
        ),
        _q(
            "conditioned",
            "image-conditioned images: mode, input, kept-region difference (0-255) and seam scores",
            """
SELECT image_id, run_id, conditioning.mode AS mode, outcome, reasons,
       round(conditioning.kept_mean_abs, 4) AS kept_mean_abs, conditioning.kept_max_abs AS kept_max_abs,
       round(conditioning.seam, 3) AS seam, round(conditioning.seam_input, 3) AS seam_input,
       round(conditioning.tile_seam, 3) AS tile_seam, round(conditioning.source_difference, 3) AS source_difference,
       conditioning.strength AS strength, conditioning.image_uri AS image_uri,
       conditioning.image_sha256 AS image_sha256, conditioning.mask_uri AS mask_uri, error
FROM images
WHERE conditioning IS NOT NULL AND ($run IS NULL OR run_id = $run) AND ($mode IS NULL OR conditioning.mode = $mode)
ORDER BY created_at, image_id""",
            _RUN,
            Param("mode", "text", "img2img, inpaint, outpaint or upscale"),
        ),
        _q(
            "products_by_category",
            "product images (tags.category) for a category, optionally in one month",
            """
SELECT image_id, tags['product_id'] AS product_id, tags['sku'] AS sku, created_at, outcome, uri
FROM images
WHERE tags['category'] = $category
  AND ($month IS NULL OR date_trunc('month', created_at) = $month)
ORDER BY product_id, created_at, image_id""",
            Param("category", "text", "the category tag's value", required=True),
            Param("month", "month", "YYYY-MM (UTC)"),
        ),
        _q(
            "by_tag",
            "images whose tag KEY has VALUE",
            """
SELECT image_id, run_id, created_at, outcome, tags, prompt, uri
FROM images WHERE tags[$key] = $value ORDER BY created_at, image_id""",
            Param("key", "text", "tag name", required=True),
            Param("value", "text", "tag value", required=True),
        ),
        _q(
            "acceptance_by_template",
            "acceptance rate and mean QC scores per prompt template",
            """
SELECT * FROM acceptance_by_template ORDER BY acceptance_rate NULLS LAST, template, version""",
        ),
        _q(
            "acceptance_by_variable",
            "acceptance and mean scores per template variable value",
            """
SELECT * FROM acceptance_by_variable
WHERE ($template IS NULL OR template = $template) AND ($variable IS NULL OR variable = $variable)
ORDER BY template, variable, acceptance_rate NULLS LAST, value""",
            Param("template", "text", "template name"),
            Param("variable", "text", "variable name"),
        ),
        _q(
            "acceptance_by_combination",
            "acceptance and mean scores per combination (base model + LoRA stack)",
            """
SELECT * FROM acceptance_by_combination ORDER BY acceptance_rate NULLS LAST, combination, model_stack""",
        ),
        _q(
            "failing_templates",
            "templates whose attempts per accepted image are high (acceptance below a threshold)",
            """
SELECT * FROM acceptance_by_template
WHERE coalesce(attempts_per_accepted, 'infinity'::DOUBLE) > coalesce($max_attempts, 1.0 / $threshold)
  AND images - failed >= $min_images
ORDER BY attempts_per_accepted DESC NULLS FIRST, template""",
            Param("threshold", "number", "flag below this acceptance rate", default=0.5),
            Param("max_attempts", "number", "flag above this many attempts per accepted image (default 1/threshold)"),
            Param("min_images", "integer", "ignore templates with fewer rendered images", default=5),
        ),
        _q(
            "attempts_per_accepted",
            "attempts per accepted image per template version, combination and tier",
            """
SELECT * FROM attempts_per_accepted
WHERE $template IS NULL OR template = $template
ORDER BY attempts_per_accepted DESC NULLS FIRST, template, combination, tier""",
            Param("template", "text", "template name"),
        ),
        _q(
            "cost_by_combination",
            "cost per image and per accepted image, per combination (base + LoRA stack)",
            f"""
SELECT coalesce(combination, '') AS combination, model_stack, {_COST}
FROM images WHERE $run IS NULL OR run_id = $run GROUP BY ALL ORDER BY usd_per_accepted DESC NULLS FIRST""",
            _RUN,
        ),
        _q(
            "cost_by_template",
            "cost per image and per accepted image, per prompt template",
            f"""
SELECT coalesce(template.name, '(no template)') AS template, template.version AS version, {_COST}
FROM images WHERE $run IS NULL OR run_id = $run GROUP BY ALL ORDER BY usd_per_accepted DESC NULLS FIRST""",
            _RUN,
        ),
        _q(
            "review_queue",
            "images waiting for a person's decision",
            """
SELECT image_id, run_id, created_at, reasons, round(sharpness, 2) AS sharpness, prompt, uri
FROM images WHERE outcome = 'review' AND ($run IS NULL OR run_id = $run)
ORDER BY created_at, image_id""",
            _RUN,
        ),
        _q(
            "decisions",
            "people's review decisions, newest first (every one, not only those in force)",
            """
SELECT decided_at, image_id, decision, reviewer, note FROM decisions
WHERE $reviewer IS NULL OR reviewer = $reviewer ORDER BY decided_at DESC, image_id""",
            Param("reviewer", "text", "only this reviewer"),
        ),
    )
}


def _convert(p: Param, raw: str):
    try:
        if p.kind == "date":
            return date.fromisoformat(raw)
        if p.kind == "month":
            if not re.fullmatch(r"\d{4}-\d{2}", raw):
                raise ValueError
            return date.fromisoformat(raw + "-01")
        if p.kind == "number":
            return float(raw)
        if p.kind == "integer":
            return int(raw)
    except ValueError:
        shape = {"date": "YYYY-MM-DD", "month": "YYYY-MM", "number": "a number", "integer": "a whole number"}[p.kind]
        raise AnalysisError(f"parameter '{p.name}' must be {shape}, not {raw!r}") from None
    return raw


def bind(query: Query, given: dict[str, str]) -> dict[str, object]:
    """The query's parameters from strings: unknown names, missing required ones, bad values fail."""
    known = {p.name: p for p in query.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        accepts = ", ".join(known) if known else "no parameters"
        raise AnalysisError(
            f"query '{query.name}' has no parameter {', '.join(map(repr, unknown))} (it takes {accepts})"
        )
    missing = [p.name for p in query.params if p.required and p.name not in given]
    if missing:
        raise AnalysisError(
            f"query '{query.name}' needs "
            + "; ".join(f"parameter {p.name} ({p.help}): --param {p.name}=…" for p in query.params if p.name in missing)
        )
    return {name: (_convert(p, given[name]) if name in given else p.default) for name, p in known.items()}


def get(name: str) -> Query:
    if name not in QUERIES:
        raise AnalysisError(f"no query named {name!r}; the queries are: {', '.join(QUERIES)}")
    return QUERIES[name]


def _sql(query: Query) -> str:
    types = {"date": "DATE", "month": "DATE", "number": "DOUBLE", "integer": "BIGINT", "text": "VARCHAR"}
    sql = query.sql
    # A null parameter has no type of its own: say which, so `$x IS NULL OR …` binds.
    for p in query.params:
        sql = re.sub(rf"\${p.name}\b", f"CAST(${p.name} AS {types[p.kind]})", sql)
    return sql


_FINAL_ORDER = re.compile(r"\s+ORDER BY [^()'$;]*$")


def _unordered(sql: str) -> str:
    """`sql` without its final ORDER BY (a count needs no order: DuckDB keeps the sort of a
    subquery, and with it every column the sort reads); unchanged where the last clause may be
    more than a plain ORDER BY (a LIMIT, parentheses, quotes or parameters after it)."""
    m = _FINAL_ORDER.search(sql)
    if m is None or re.search(r"\b(LIMIT|OFFSET|FETCH)\b", m.group(0), re.IGNORECASE):
        return sql
    return sql[: m.start()]


def _page(limit: int | None, offset: int) -> str:
    if (limit is not None and limit < 1) or offset < 0:
        raise AnalysisError(f"a page needs --limit of at least 1 and --offset of 0 or more, not {limit}, {offset}")
    if limit is None and not offset:
        return ""
    return f"\nLIMIT {'NULL' if limit is None else int(limit)} OFFSET {int(offset)}"


def run_query(
    con: duckdb.DuckDBPyConnection,
    name: str,
    params: dict[str, str] | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> tuple[list[str], list[tuple]]:
    """Run a named query; returns (column names, rows): all of them, or `limit` rows from `offset`
    (a page of a query that lists images: a million-image catalog answers with many; fetching
    hundreds of thousands of rows into Python costs seconds, `export_query` writes them)."""
    query = get(name)
    values = bind(query, params or {})
    page = _page(limit, offset)
    result = con.execute(_sql(query) + page, values)
    rows = result.fetchall()
    return [d[0] for d in result.description], rows


def count_query(con: duckdb.DuckDBPyConnection, name: str, params: dict[str, str] | None = None) -> int:
    """How many rows the named query answers with (the total beside a page)."""
    query = get(name)
    values = bind(query, params or {})
    row = con.execute(f"SELECT count(*) FROM ({_unordered(_sql(query))})", values).fetchone()
    return int(row[0]) if row else 0


EXPORT_FORMATS = {".parquet": "FORMAT parquet", ".csv": "FORMAT csv, HEADER true", ".json": "FORMAT json, ARRAY true"}


def export_query(
    con: duckdb.DuckDBPyConnection,
    name: str,
    path: str,
    params: dict[str, str] | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> int:
    """Write the named query's rows (all, or a page) to a local `path` (.parquet, .csv or .json)
    with DuckDB's COPY, which streams them without Python; returns how many rows it wrote."""
    query = get(name)
    values = bind(query, params or {})
    suffix = "." + path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in EXPORT_FORMATS:
        raise AnalysisError(f"--out {path!r}: name a .parquet, .csv or .json file")
    target = sql_string(path)
    sql = f"COPY ({_sql(query)}{_page(limit, offset)}) TO {target} ({EXPORT_FORMATS[suffix]})"
    try:
        row = con.execute(sql, values).fetchone()
    except duckdb.IOException as e:
        raise AnalysisError(f"--out {path!r}: cannot write ({str(e).strip()})") from None
    return int(row[0]) if row else 0
