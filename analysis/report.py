"""`imagefab report`: one self-contained HTML page about a run (or every run) of an output.

Everything is inlined — plots as PNG, thumbnails as WebP, both base64 — so the page can be mailed
or attached to a ticket and opened offline. Sections: the numbers, the runs, plots (acceptance
by combination, QC score distributions, cost breakdown, throughput over time), prompt
performance, cost, and contact sheets of accepted, review and rejected images with their reasons.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from analysis import plots
from analysis.cost import CostReport, _money, _size, cost_report
from analysis.thumbs import thumbnail
from analysis.views import AnalysisError, connect, one_row, resolve_run
from app.cost import PriceTable
from app.storage import OutputStore, StorageError

SHEETS = (("accepted", "Accepted"), ("review", "Waiting for review"), ("rejected", "Rejected"))

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666} table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top} td.n,th.n{text-align:right}
td:first-child{white-space:nowrap} .wide{overflow-x:auto}
.stats{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.stat{border:1px solid #ddd;border-radius:8px;padding:8px 14px;min-width:110px}
.stat b{display:block;font-size:22px} .stat span{color:#666;font-size:12px}
.plot{max-width:100%;display:block;margin:8px 0}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.tile{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:11px;overflow:hidden}
.tile img{width:100%;height:auto;display:block;border-radius:4px;background:#f3f3f3}
.tile code{font-size:11px} .why{color:#b71c1c} .flag{color:#b71c1c;font-weight:600}
.missing{height:138px;display:flex;align-items:center;justify-content:center;background:#f3f3f3;color:#999}
"""


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _table(columns: list[str], rows: list[tuple], table_id: str = "") -> str:
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and rows for i in range(len(columns))]
    head = "".join(f"<th{' class=n' if numeric[i] else ''}>{escape(c)}</th>" for i, c in enumerate(columns))
    body = "".join(
        "<tr>"
        + "".join(
            f'<td{" class=n" if numeric[i] else ""} data-col="{escape(columns[i])}">{escape(_fmt(v))}</td>'
            for i, v in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f'<div class="wide"><table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _query(con, sql: str, params: dict | None = None) -> tuple[list[str], list[tuple]]:
    result = con.execute(sql, params or {})
    rows = result.fetchall()
    return [d[0] for d in result.description], rows


def _summary(output: OutputStore, run_id: str) -> dict:
    try:
        return json.loads(output.read_bytes(f"runs/{run_id}/summary.json"))
    except (StorageError, ValueError):
        return {}


def _stat(key: str, value, label: str) -> str:
    return f'<div class="stat" id="stat-{key}"><b>{escape(_fmt(value))}</b><span>{escape(label)}</span></div>'


def _sheet(output: OutputStore, rows: list[dict], total: int, outcome: str, title: str) -> str:
    tiles = []
    for r in rows:
        data = thumbnail(output, r)
        alt = f"{outcome} image {r['image_id']}"
        pic = (
            f'<img src="{_b64(data, "image/webp")}" alt="{escape(alt)}" title="{escape(r["prompt"] or "")}">'
            if data
            else '<div class="missing">no image file</div>'
        )
        why = ", ".join(r["reasons"] or [])
        if r["reviewer"]:
            why = f"{why}; {r['approval']} by {r['reviewer']}" + (f": {r['review_note']}" if r["review_note"] else "")
        sharp = f"sharpness {r['sharpness']:.0f}" if r["sharpness"] is not None else ""
        tiles.append(
            f'<div class="tile" data-image-id="{r["image_id"]}">{pic}<code>{r["image_id"][:12]}</code>'
            f"<div>{escape(r['row_key'] or '')} {escape(sharp)}</div>"
            f'<div class="why">{escape(why.strip("; "))}</div></div>'
        )
    shown = f"{len(rows)} of {total}" if total > len(rows) else f"{total}"
    body = "".join(tiles) if tiles else "<p>none</p>"
    return f'<section id="sheet-{outcome}"><h3>{escape(title)} ({shown})</h3><div class="sheet">{body}</div></section>'


# Per template variable value: images sharing a variables map are counted once per map and only
# those groups unnested (as the acceptance_by_variable view does).
VARIABLES_SQL = """
    WITH per_map AS (
        SELECT coalesce(template.name, '(no template)') AS template, variables,
               count(*) AS images, count(*) FILTER (outcome = 'accepted') AS accepted,
               count(*) FILTER (outcome = 'review') AS review, count(*) FILTER (outcome = 'rejected') AS rejected,
               count(*) FILTER (outcome = 'failed') AS failed, count(*) FILTER (outcome <> 'failed') AS rendered,
               sum(sharpness) AS sharpness_sum, count(sharpness) AS sharpness_n,
               sum(contrast) AS contrast_sum, count(contrast) AS contrast_n,
               sum(exposure) AS exposure_sum, count(exposure) AS exposure_n
        FROM scope WHERE variables IS NOT NULL GROUP BY template, variables),
    entries AS (SELECT * EXCLUDE (variables), unnest(map_entries(variables)) AS v FROM per_map)
    SELECT template, v.key AS variable, v.value AS value, sum(images)::BIGINT AS images,
           sum(accepted)::BIGINT AS accepted, sum(review)::BIGINT AS review, sum(rejected)::BIGINT AS rejected,
           sum(failed)::BIGINT AS failed, round(sum(accepted) / nullif(sum(rendered), 0), 4) AS acceptance_rate,
           round(sum(sharpness_sum) / nullif(sum(sharpness_n), 0), 1) AS mean_sharpness,
           round(sum(contrast_sum) / nullif(sum(contrast_n), 0), 4) AS mean_contrast,
           round(sum(exposure_sum) / nullif(sum(exposure_n), 0), 4) AS mean_exposure
    FROM entries GROUP BY template, v.key, v.value
    ORDER BY template, variable, acceptance_rate NULLS LAST"""
# The columns the sections read, once, into a table (`scope`). Of the structs only the fields the
# sections use are read (a template's text, a backend's other fields stay in the files); the
# contact sheets read their few rows' other columns by key (_sheet_rows).
SCOPE_COLUMNS = (
    *("image_id", "run_id", "created_at", "outcome", "approval", "reviewer", "review_note"),
    "struct_pack(name := template.name, version := template.version) AS template",
    *("variables", "combination", "model_stack", "tier"),
    "struct_pack(name := backend.name, api_cost_usd := backend.api_cost_usd) AS backend",
    *("accelerator", "gpu_seconds", "cpu_seconds", "cost_usd", "master_bytes", "variant_bytes"),
    *("sharpness", "contrast", "exposure"),
)
SCORES = ("sharpness", "contrast", "exposure")
BINS = 20  # histogram bins per QC score
CURVE_POINTS = 20_000  # points of the throughput plot, over all its runs


def _score_bins(con) -> dict[str, tuple[list[float], dict[str, list[int]]]]:
    """Each QC score's histogram per outcome, binned by DuckDB: {score: (edges, {outcome: counts})}.
    BINS equal bins from the lowest to the highest value (one bin where they are equal)."""
    ranges = one_row(
        con.execute(
            "SELECT " + ", ".join(f"min({s}), max({s})" for s in SCORES) + " FROM scope WHERE outcome <> 'failed'"
        )
    )
    out: dict[str, tuple[list[float], dict[str, list[int]]]] = {}
    for i, score in enumerate(SCORES):
        lo, hi = ranges[2 * i], ranges[2 * i + 1]
        if lo is None:
            out[score] = ([0.0, 1.0], {})
            continue
        bins = BINS if hi > lo else 1
        width = (hi - lo) / bins if hi > lo else 1.0
        edges = [lo + width * b for b in range(bins + 1)] if hi > lo else [lo - 0.5, lo + 0.5]
        counts: dict[str, list[int]] = {}
        for outcome, b, n in con.execute(
            f"SELECT outcome, least(floor(({score} - $lo) / $width), $last)::INTEGER AS b, count(*) FROM scope "
            f"WHERE outcome <> 'failed' AND {score} IS NOT NULL GROUP BY ALL",
            {"lo": lo if hi > lo else lo - 0.5, "width": width, "last": bins - 1},
        ).fetchall():
            counts.setdefault(outcome, [0] * bins)[b] += n
        out[score] = (edges, {o: counts[o] for o in plots.OUTCOME_COLOURS if o in counts})
    return out


def _throughput(con, runs: int) -> dict[str, tuple[list, list[int]]]:
    """Each run's cumulative images over time: every row of a small run, every k-th (and the last)
    of a large one, so the plot has about CURVE_POINTS points however many images there are."""
    per_run = max(CURVE_POINTS // max(runs, 1), 50)
    series: dict[str, tuple[list, list[int]]] = {}
    for run_id, t, n in con.execute(
        """
        SELECT run_id, created_at, n FROM (
            SELECT run_id, created_at, row_number() OVER (PARTITION BY run_id ORDER BY created_at) AS n,
                   count(*) OVER (PARTITION BY run_id) AS total
            FROM scope)
        WHERE n = 1 OR n = total OR n % greatest(total // $per_run, 1) = 0
        ORDER BY min(created_at) OVER (PARTITION BY run_id), run_id, n""",
        {"per_run": per_run},
    ).fetchall():
        times, written = series.setdefault(run_id, ([], []))
        times.append(t)
        written.append(n)
    return series


def _sheet_rows(con, rows: list[dict]) -> dict[tuple, dict]:
    """The prompt and the other catalog columns a contact sheet shows of each of these image rows,
    keyed (image_id, run_id, created_at): one read of their runs' partitions."""
    if not rows:
        return {}
    result = con.execute(
        "SELECT image_id, run_id, created_at, prompt, reasons, row_key, uri, variants FROM catalog "
        "WHERE run_id IN (SELECT unnest($runs)) AND image_id IN (SELECT unnest($ids))",
        {"runs": sorted({r["run_id"] for r in rows}), "ids": sorted({r["image_id"] for r in rows})},
    )
    names = [d[0] for d in result.description]
    return {r[:3]: dict(zip(names[3:], r[3:])) for r in result.fetchall()}


def build_report(
    output: OutputStore | str,
    run: str | None = None,
    prices: PriceTable | None = None,
    prices_from: str = "defaults",
    max_thumbs: int = 60,
    threshold: float = 0.5,
) -> str:
    """The report's HTML."""
    if max_thumbs < 0:
        raise AnalysisError(f"--max-thumbs must be 0 or more, not {max_thumbs}")
    output = OutputStore.of(output)
    prices = prices or PriceTable()
    con = connect(output, file_sizes=True, search_index=False)
    run = resolve_run(con, run)
    # The columns every section reads, once, into a table: each query over the `images` view
    # reads and ranks the catalog again (a second or more at a million images). Prompts, tags and
    # the other wide columns stay out; the contact sheets read those of their few images.
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE scope AS SELECT {', '.join(SCOPE_COLUMNS)} FROM images "
        "WHERE $run IS NULL OR run_id = $run",
        {"run": run},
    )
    cost: CostReport = cost_report(con, prices, run, prices_from, source="scope")
    scope = run or "all runs"

    # 1. The numbers
    counts = dict(con.execute("SELECT outcome, count(*) FROM scope GROUP BY outcome").fetchall())
    n = sum(counts.values())
    rendered = n - counts.get("failed", 0)
    stats = "".join(
        [
            _stat("images", n, "images"),
            _stat("accepted", counts.get("accepted", 0), "accepted"),
            _stat("review", counts.get("review", 0), "waiting for review"),
            _stat("rejected", counts.get("rejected", 0), "rejected"),
            _stat("failed", counts.get("failed", 0), "failed"),
            _stat(
                "acceptance", f"{counts.get('accepted', 0) / rendered:.1%}" if rendered else "-", "accepted of rendered"
            ),
            _stat("cost-per-accepted", _money(cost.usd_per_accepted), "compute per accepted image"),
        ]
    )

    # 2. Runs
    cols, runs = _query(
        con,
        """
        SELECT run_id, count(*) AS images, count(*) FILTER (outcome = 'accepted') AS accepted,
               count(*) FILTER (outcome = 'review') AS review, count(*) FILTER (outcome = 'rejected') AS rejected,
               count(*) FILTER (outcome = 'failed') AS failed, sum(gpu_seconds) AS device_s, sum(cpu_seconds) AS cpu_s,
               sum(cost_usd) AS cost_usd, min(created_at) AS first_written, any_value(accelerator) AS accelerator
        FROM scope GROUP BY run_id ORDER BY first_written""",
    )
    run_rows = []
    for r in runs:
        s = _summary(output, r[0])
        run_rows.append((*r[:8], _money(r[8]), *r[9:], s.get("wall_seconds"), s.get("images_per_second")))
    run_table = _table([*cols, "wall_s", "images_per_s"], run_rows, "runs")

    # 3. Plots
    _, combos = _query(
        con,
        """
        SELECT coalesce(nullif(combination, '') || ': ', '') || model_stack AS label,
               count(*) FILTER (outcome = 'accepted'), count(*) FILTER (outcome = 'review'),
               count(*) FILTER (outcome = 'rejected'), count(*) FILTER (outcome = 'failed')
        FROM scope GROUP BY label ORDER BY label""",
    )
    labels = [c[0] for c in combos]
    acceptance_png = plots.acceptance_bars(
        labels, {o: [c[i + 1] for c in combos] for i, o in enumerate(plots.OUTCOME_COLOURS)}
    )
    score_data = _score_bins(con)
    scores_png = plots.score_histograms(score_data)
    storage_per_byte = prices.storage_gb_month / 2**30
    _, combo_costs = _query(
        con,
        """
        SELECT coalesce(combination, ''), model_stack, sum(gpu_usd), sum(cpu_usd), sum(stored_bytes)
        FROM image_costs WHERE run_id = $run OR $run IS NULL GROUP BY ALL ORDER BY 2""",
        {"run": run},
    )
    cost_png = plots.cost_bars(
        [f"{c[0]}: {c[1]}" if c[0] else c[1] for c in combo_costs],
        {
            "device": [c[2] for c in combo_costs],
            "CPU (QC, post)": [c[3] for c in combo_costs],
            "storage / month": [c[4] * storage_per_byte for c in combo_costs],
        },
    )
    throughput_png = plots.throughput(_throughput(con, runs=len(runs)))

    # 4. Prompt performance
    perf_sql = """
        SELECT {key}, count(*) AS images, count(*) FILTER (outcome = 'accepted') AS accepted,
               count(*) FILTER (outcome = 'review') AS review, count(*) FILTER (outcome = 'rejected') AS rejected,
               count(*) FILTER (outcome = 'failed') AS failed,
               round(count(*) FILTER (outcome = 'accepted') / nullif(count(*) FILTER (outcome <> 'failed'), 0), 4) AS acceptance_rate,
               round(avg(sharpness), 1) AS mean_sharpness, round(avg(contrast), 4) AS mean_contrast,
               round(avg(exposure), 4) AS mean_exposure
        FROM {source} GROUP BY ALL ORDER BY {order}acceptance_rate NULLS LAST"""
    t_cols, templates = _query(
        con, perf_sql.format(key="coalesce(template.name, '(no template)') AS template", source="scope", order="")
    )
    flagged = [t for t in templates if t[6] is not None and t[6] < threshold]
    v_cols, variables = _query(con, VARIABLES_SQL)
    c_cols, combo_perf = _query(
        con, perf_sql.format(key="coalesce(combination, '') AS combination, model_stack", source="scope", order="")
    )
    # What a quota pays: rendered images per accepted one, per template version, combination and tier.
    a_cols, attempts = _query(
        con,
        """
        SELECT coalesce(template.name, '(no template)') AS template, template.version AS version,
               coalesce(combination, '') AS combination, coalesce(tier, '') AS tier,
               count(*) FILTER (outcome <> 'failed') AS rendered, count(*) FILTER (outcome = 'accepted') AS accepted,
               round(count(*) FILTER (outcome <> 'failed') / nullif(count(*) FILTER (outcome = 'accepted'), 0), 2)
                   AS attempts_per_accepted
        FROM scope GROUP BY ALL ORDER BY attempts_per_accepted DESC NULLS FIRST, template, combination, tier""",
    )
    flag_html = (
        (
            f'<p class="flag" id="flagged">Templates accepted less than {threshold:.0%} of the time: '
            + escape(", ".join(f"{t[0]} ({t[6]:.0%})" for t in flagged))
            + "</p>"
        )
        if flagged
        else f'<p id="flagged">No template is accepted less than {threshold:.0%} of the time.</p>'
    )

    # 5. Cost
    cost_rows = [
        ("device (GPU) seconds", f"{cost.gpu_seconds:.1f}", _money(cost.gpu_usd)),
        ("CPU seconds (QC, post-processing)", f"{cost.cpu_seconds:.1f}", _money(cost.cpu_usd)),
        ("compute total", "", _money(cost.compute_usd)),
        ("per rendered image", "", _money(cost.usd_per_image)),
        ("per accepted image", "", _money(cost.usd_per_accepted)),
        (
            "stored (masters + variants)",
            _size(cost.master_bytes + cost.variant_bytes),
            _money(cost.storage_usd_month) + " / month",
        ),
    ]
    api_rows = [
        (
            f"£{c.api_gbp:.3f}",
            f"${c.api_usd:.4f}",
            _money(c.self_hosted_usd_per_accepted),
            f"{c.ratio:.2%}" if c.ratio is not None else "-",
            f"{c.break_even_images_per_month:,.0f}" if c.break_even_images_per_month else "never",
            f"{c.node_capacity_per_month:,.0f}" if c.node_capacity_per_month else "-",
        )
        for c in cost.api
    ]

    # 6. Contact sheets: the first max_thumbs images of each outcome, and their prompts.
    pages = {}
    for outcome, _ in SHEETS:
        (total,) = one_row(con.execute("SELECT count(*) FROM scope WHERE outcome = $o", {"o": outcome}))
        result = con.execute(
            "SELECT image_id, run_id, created_at, sharpness, approval, reviewer, review_note FROM scope "
            "WHERE outcome = $o ORDER BY created_at, image_id LIMIT $n",
            {"o": outcome, "n": max_thumbs},
        )
        names = [d[0] for d in result.description]
        pages[outcome] = (total, [dict(zip(names, r)) for r in result.fetchall()])
    details = _sheet_rows(con, [r for _, rows in pages.values() for r in rows])
    empty = {"prompt": None, "reasons": None, "row_key": None, "uri": None, "variants": None}
    sheets = []
    for outcome, title in SHEETS:
        total, rows = pages[outcome]
        rows = [{**r, **details.get((r["image_id"], r["run_id"], r["created_at"]), empty)} for r in rows]
        sheets.append(_sheet(output, rows, total, outcome, title))

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    img = lambda png, alt, ident: f'<img class="plot" id="{ident}" alt="{escape(alt)}" src="{_b64(png, "image/png")}">'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imagefab report: {escape(scope)}</title>
<link rel="icon" href="data:,"><style>{CSS}</style></head>
<body>
<h1>imagefab report: {escape(scope)}</h1>
<p class="meta">Output {escape(output.uri)} · generated {generated} · prices: {escape(prices_from)}</p>
<div class="stats">{stats}</div>
<h2>Runs</h2>
{run_table}
<h2>Acceptance by combination</h2>
{img(acceptance_png, "Images by outcome for each combination", "plot-acceptance")}
<h2>QC score distributions</h2>
{img(scores_png, "Histograms of sharpness, contrast and exposure by outcome", "plot-scores")}
<h2>Cost breakdown</h2>
{img(cost_png, "Device, CPU and monthly storage cost per combination", "plot-cost")}
{_table(["item", "amount", "USD"], cost_rows, "cost")}
<h3>Against a hosted image API</h3>
<p>At ${prices.usd_per_gbp:.2f} per £. An always-on {escape(cost.gpu_node)} node costs {_money(cost.node_monthly_usd)} a
month; break-even is the number of accepted images a month at which it costs the same as the API.</p>
{_table(["API £/image", "API $/image", "self-hosted $/accepted", "self-hosted / API", "break-even images/month", "one node's capacity/month"], api_rows, "api")}
<h2>Throughput</h2>
{img(throughput_png, "Cumulative images written over time, per run", "plot-throughput")}
<h2>Prompt performance</h2>
{flag_html}
<h3>By template</h3>
{_table(t_cols, templates, "templates")}
<h3>By combination</h3>
{_table(c_cols, combo_perf, "combinations")}
<h3>Attempts per accepted image</h3>
<p>Images rendered for each accepted one (a quota renders this many on average; none accepted: blank).</p>
{_table(a_cols, attempts, "attempts")}
<h3>By template variable value</h3>
{_table(v_cols, variables, "variables")}
<h2>Contact sheets</h2>
{"".join(sheets)}
</body></html>
"""


def write_report(output: OutputStore | str, out: str | Path, **kwargs) -> Path:
    html = build_report(output, **kwargs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path
