"""The analysis views and named queries over a small real output (tests/analysis_catalog.py)."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime

import duckdb
import pytest
from analysis_catalog import RUNS, cli, image_id, make_output

import analysis
from analysis.queries import QUERIES, run_query
from analysis.views import VIEWS_SQL
from app.review import decide


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    make_output(str(root))
    return root


@pytest.fixture(scope="module")
def con(output):
    return analysis.connect(str(output))


def rows(con, name, **params):
    columns, values = run_query(con, name, {k: str(v) for k, v in params.items()})
    return [dict(zip(columns, v)) for v in values]


def ids(*numbers):
    return [image_id(n) for n in numbers]


def test_images_has_one_row_per_image_the_latest(con):
    (n_catalog,) = con.execute("SELECT count(*) FROM catalog").fetchone()
    (n_images, n_ids) = con.execute("SELECT count(*), count(DISTINCT image_id) FROM images").fetchone()
    assert (n_catalog, n_images, n_ids) == (13, 12, 12)
    # P-9 failed (out of memory) in run a and was rendered again in run b: the rerun's row wins.
    status, run, error = con.execute(
        "SELECT status, run_id, error FROM images WHERE image_id = $i", {"i": image_id(9)}
    ).fetchone()
    assert (status, run, error) == ("accepted", RUNS["b"][0], "")
    outcomes = dict(con.execute("SELECT outcome, count(*) FROM images GROUP BY ALL").fetchall())
    assert outcomes == {"accepted": 7, "review": 2, "rejected": 2, "failed": 1}
    stack = dict(con.execute("SELECT model_stack, count(*) FROM images GROUP BY ALL").fetchall())
    assert stack == {"tiny-sdxl:1 + style:1@0.8": 7, "tiny-sdxl:1 + style:1@0.8 + detail:2@0.5": 3, "tiny-sdxl:1": 2}


def test_decisions_join_as_approval_and_outcome(tmp_path):
    out = make_output(str(tmp_path))
    decide(out, ids(5), "approved", "alice", now=datetime(2026, 12, 4, tzinfo=UTC))
    decide(out, ids(7), "approved", "alice", now=datetime(2026, 12, 4, tzinfo=UTC))
    decide(out, ids(7), "rejected", "bob", note="logo", now=datetime(2026, 12, 5, tzinfo=UTC))
    con = analysis.connect(out)
    got = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT image_id, status, approval, outcome, reviewer, review_note FROM images WHERE image_id IN ($a, $b, $c)",
            {"a": image_id(5), "b": image_id(7), "c": image_id(1)},
        ).fetchall()
    }
    assert got == {
        image_id(5): ("review", "approved", "accepted", "alice", ""),
        image_id(7): ("review", "rejected", "rejected", "bob", "logo"),
        image_id(1): ("accepted", "pending", "accepted", None, None),
    }
    assert [r["decision"] for r in rows(con, "decisions")] == ["rejected", "approved", "approved"]
    assert [r["image_id"] for r in rows(con, "rejected_by_reason", reason="borderline_low_contrast")] == ids(7)
    assert rows(con, "review_queue") == []


def test_views_sql_reads_the_same_from_a_plain_duckdb(tmp_path):
    """What someone gets with `SET VARIABLE imagefab_output = …; .read analysis/views.sql`."""
    out = make_output(str(tmp_path))
    con = analysis.connect(out, file_sizes=True)
    plain = duckdb.connect()
    plain.execute("SET VARIABLE imagefab_output = $o", {"o": str(tmp_path)})
    plain.execute(VIEWS_SQL.read_text())
    for sql in (
        "SELECT image_id, status, approval, outcome, model_stack, run_id, date, master_bytes FROM images ORDER BY image_id",
        "SELECT * FROM acceptance_by_template ORDER BY template",
        "SELECT * FROM acceptance_by_combination ORDER BY model_stack",
        "SELECT image_id, round(score, 6) FROM search_images('red leather boot')",
    ):
        assert plain.execute(sql).fetchall() == con.execute(sql).fetchall(), sql
    # With a decision on file, a fresh `.read` picks up decisions too.
    decide(out, ids(5), "approved", "carol")
    plain.execute(VIEWS_SQL.read_text())
    assert plain.execute("SELECT approval FROM images WHERE image_id = $i", {"i": image_id(5)}).fetchone() == (
        "approved",
    )


def test_lora_in_a_date_range(con):
    assert [r["image_id"] for r in rows(con, "by_lora", lora="detail")] == ids(7, 8, 10)
    assert sorted(r["image_id"] for r in rows(con, "by_lora", lora="style", start="2026-12-01")) == ids(7, 8, 9, 10)
    assert [r["image_id"] for r in rows(con, "by_lora", lora="style", end="2026-11-30")] == ids(1, 2, 3, 4, 5, 6)
    assert rows(con, "by_lora", lora="style", version="2") == []
    assert {r["lora_version"] for r in rows(con, "by_lora", lora="detail", version="2")} == {"2"}


def test_rejected_for_a_reason_and_products_by_month(con):
    assert [r["image_id"] for r in rows(con, "rejected_by_reason", reason="blur")] == ids(6)
    assert [r["image_id"] for r in rows(con, "rejected_by_reason", reason="low_contrast")] == ids(8)
    november = rows(con, "products_by_category", category="footwear", month="2026-11")
    assert [(r["product_id"], r["outcome"]) for r in november] == [("P-1", "accepted"), ("P-2", "accepted")]
    december = rows(con, "products_by_category", category="footwear", month="2026-12")
    assert [(r["product_id"], r["outcome"]) for r in december] == [("P-1", "failed"), ("P-9", "accepted")]
    assert len(rows(con, "products_by_category", category="footwear")) == 4
    assert [r["image_id"] for r in rows(con, "by_tag", key="style", value="painted")] == ids(11, 12)


def test_acceptance_by_template_variable_and_combination(con):
    by_template = {r["template"]: r for r in rows(con, "acceptance_by_template")}
    studio = by_template["studio"]
    assert (studio["images"], studio["accepted"], studio["review"], studio["rejected"], studio["failed"]) == (
        7,
        5,
        1,
        1,
        0,
    )
    assert studio["acceptance_rate"] == round(5 / 7, 4)
    assert by_template["lifestyle"]["acceptance_rate"] == 0.0 and by_template["lifestyle"]["failed"] == 1
    assert by_template["(no template)"]["acceptance_rate"] == 1.0
    assert studio["mean_sharpness"] == round((400 + 380 + 360 + 340 + 90 + 20 + 300) / 7, 2)

    red = rows(con, "acceptance_by_variable", template="studio", variable="color")
    red = {r["value"]: r for r in red}["red"]
    assert (red["images"], red["accepted"], red["rejected"], red["acceptance_rate"]) == (2, 1, 1, 0.5)

    combos = {r["model_stack"]: r for r in rows(con, "acceptance_by_combination")}
    assert combos["tiny-sdxl:1 + style:1@0.8"]["acceptance_rate"] == round(5 / 7, 4)
    assert combos["tiny-sdxl:1 + style:1@0.8 + detail:2@0.5"]["acceptance_rate"] == 0.0


def test_failing_templates_threshold(con):
    assert rows(con, "failing_templates") == []  # lifestyle has only 2 rendered images (min_images 5)
    assert [r["template"] for r in rows(con, "failing_templates", min_images=2)] == ["lifestyle"]
    assert [r["template"] for r in rows(con, "failing_templates", threshold=0.8, min_images=2)] == [
        "lifestyle",
        "studio",
    ]


def test_failing_templates_by_attempts_per_accepted_image(con):
    studio = {r["template"]: r for r in rows(con, "acceptance_by_template")}["studio"]
    assert studio["attempts_per_accepted"] == round(7 / 5, 2)  # 7 rendered, 5 accepted
    assert [r["template"] for r in rows(con, "failing_templates", max_attempts=1.3, min_images=2)] == [
        "lifestyle",  # nothing accepted: first
        "studio",
    ]
    assert [r["template"] for r in rows(con, "failing_templates", max_attempts=1.5, min_images=2)] == ["lifestyle"]
    per = rows(con, "attempts_per_accepted", template="studio")
    assert per and sum(r["rendered"] for r in per) == 7 and sum(r["accepted"] for r in per) == 5
    assert {"template", "version", "combination", "tier", "attempts_per_accepted"} <= set(per[0])


def test_cost_per_accepted_image_per_template(con):
    per_image = (2 * 2.99 + 0.5 * 0.048) / 3600  # every studio render: 2 H100-seconds + 0.5 CPU-seconds
    studio = {r["template"]: r for r in rows(con, "cost_by_template")}["studio"]
    assert studio["usd_per_accepted"] == pytest.approx(7 * per_image / 5, rel=1e-4)
    combos = {r["model_stack"]: r for r in rows(con, "cost_by_combination", run=RUNS["c"][0])}
    assert list(combos) == ["tiny-sdxl:1"] and combos["tiny-sdxl:1"]["accepted"] == 2


def test_every_named_query_runs(con):
    required = {
        "by_lora": {"lora": "style"},
        "rejected_by_reason": {"reason": "blur"},
        "products_by_category": {"category": "bags"},
        "by_tag": {"key": "sku", "value": "SKU-3"},
    }
    for name in QUERIES:
        columns, _ = run_query(con, name, required.get(name, {}))
        assert columns, name


def test_query_cli_formats(output, capsys):
    assert cli("query", "acceptance_by_template", "--output", str(output), "--format", "json") == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["template"] for d in data} == {"studio", "lifestyle", "(no template)"}
    assert cli("query", "by_lora", "--param", "lora=detail", "--output", str(output), "--format", "csv") == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["image_id"] for r in table] == ids(7, 8, 10)
    assert cli("query", "runs", "--output", str(output)) == 0
    out = capsys.readouterr().out
    assert all(run_id in out for run_id, _, _ in RUNS.values()) and "(3 rows)" in out
    assert cli("query", "--list") == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in QUERIES) and "lora=…" in listed
    assert (
        cli("sql", "SELECT outcome, count(*) AS n FROM images GROUP BY ALL ORDER BY n DESC", "--output", str(output))
        == 0
    )
    assert capsys.readouterr().out.splitlines()[2].split() == ["accepted", "7"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["query", "nope"], "no query named 'nope'; the queries are: runs, outcomes, by_lora"),
        (
            ["query", "by_lora"],
            "query 'by_lora' needs parameter lora (LoRA name, as in the model catalog): --param lora=…",
        ),
        (
            ["query", "by_lora", "--param", "lora=x", "--param", "start=2026-13-01"],
            "parameter 'start' must be YYYY-MM-DD, not '2026-13-01'",
        ),
        (
            ["query", "products_by_category", "--param", "category=x", "--param", "month=2026-1"],
            "parameter 'month' must be YYYY-MM",
        ),
        (["query", "runs", "--param", "lora=x"], "query 'runs' has no parameter 'lora' (it takes no parameters)"),
        (["query", "by_lora", "--param", "lora"], "--param takes KEY=VALUE, not 'lora'"),
        (["query"], "name a query (imagefab query NAME); the queries are: runs"),
        (["sql", "SELECT * FROM nowhere"], "Table with name nowhere does not exist"),
        (["sql", "SELEC 1"], 'syntax error at or near "SELEC"'),
        (["search", "   "], "nothing to search for"),
        (["search", "--- !!"], "has no searchable words"),
        (["cost", "zzzz"], "no run 'zzzz' in this catalog; the runs are: game-20261203-110000-cccc"),
        (["cost", "shop"], "'shop' matches several runs"),
    ],
)
def test_bad_input_is_one_clear_line(output, capsys, argv, message):
    assert cli(*argv, "--output", str(output)) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagefab: error: ") and message in err and "Traceback" not in err


def test_no_catalog_is_a_clear_error(tmp_path, capsys):
    for argv in (["sql", "SELECT 1"], ["query", "runs"], ["search", "boot"], ["cost"], ["report"]):
        assert cli(*argv, "--output", str(tmp_path / "nothing")) == 2
        err = capsys.readouterr().err
        assert f"no catalog under {tmp_path / 'nothing'}/catalog" in err and "Traceback" not in err, argv
    with pytest.raises(analysis.AnalysisError, match="no catalog under"):
        analysis.connect(str(tmp_path))


def test_report_shows_attempts_per_accepted_image(output, tmp_path):
    from analysis.report import write_report

    page = write_report(str(output), tmp_path / "report.html").read_text()
    section = page.split("<h3>Attempts per accepted image</h3>", 1)[1].split("<h3>", 1)[0]
    assert 'id="attempts"' in section and "attempts_per_accepted" in section and "studio" in section


# ---- a million-image catalog answers with pages and exports; the sums of the views hold


def test_acceptance_by_variable_equals_every_image_unnested(con):
    # The view counts images once per variables map, then unnests the maps: the same numbers as
    # unnesting every image's map.
    naive = con.execute("""
        SELECT coalesce(template.name, '(no template)') AS template, v.key AS variable, v.value AS value,
               count(*) AS images, count(*) FILTER (outcome = 'accepted') AS accepted,
               count(*) FILTER (outcome = 'review') AS review, count(*) FILTER (outcome = 'rejected') AS rejected,
               count(*) FILTER (outcome = 'failed') AS failed,
               round(count(*) FILTER (outcome = 'accepted') / nullif(count(*) FILTER (outcome <> 'failed'), 0), 4),
               round(avg(sharpness), 2), round(avg(contrast), 4), round(avg(exposure), 4), round(avg(clip_score), 4)
        FROM images, unnest(map_entries(variables)) AS t(v) GROUP BY ALL ORDER BY ALL""").fetchall()
    view = con.execute("SELECT * FROM acceptance_by_variable ORDER BY ALL").fetchall()
    assert len(naive) > 3 and view == naive


def test_by_lora_lists_each_matching_entry_of_the_list():
    # An image rendered with two versions of one LoRA is listed once per matching entry.
    con = duckdb.connect()
    lora = lambda v: {"name": "style", "version": v, "weight": 0.5, "sha256": "", "source": ""}
    con.execute(
        "CREATE TABLE images AS SELECT * FROM (VALUES "
        "('a', 'r', TIMESTAMPTZ '2026-12-01', $two, 's', 'accepted', 'p', 'u'), "
        "('b', 'r', TIMESTAMPTZ '2026-12-02', $none, 's', 'accepted', 'p', 'u')) "
        "AS t(image_id, run_id, created_at, loras, model_stack, outcome, prompt, uri)",
        {"two": [lora("1"), lora("2")], "none": []},
    )
    got = run_query(con, "by_lora", {"lora": "style"})[1]
    assert [(r[0], r[3]) for r in got] == [("a", "1"), ("a", "2")]
    assert [(r[0], r[3]) for r in run_query(con, "by_lora", {"lora": "style", "version": "2"})[1]] == [("a", "2")]
    assert run_query(con, "by_lora", {"lora": "other"})[1] == []


def test_query_cli_prints_a_page_with_the_total_and_exports_every_row(output, tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    import analysis.cli

    monkeypatch.setattr(analysis.cli, "QUERY_PAGE", 2)
    assert cli("query", "by_lora", "--param", "lora=detail", "--output", str(output)) == 0
    shown = capsys.readouterr()
    assert "(2 rows)" in shown.out and image_id(10) not in shown.out
    assert "1-2 of 3 rows; next: --offset 2" in shown.err
    assert cli("query", "by_lora", "--param", "lora=detail", "--offset", "2", "--output", str(output)) == 0
    assert image_id(10) in capsys.readouterr().out
    assert cli("query", "by_lora", "--param", "lora=detail", "--all", "--output", str(output)) == 0
    assert "(3 rows)" in capsys.readouterr().out
    # csv and json are read by programs: every row, as before
    assert cli("query", "by_lora", "--param", "lora=detail", "--format", "csv", "--output", str(output)) == 0
    assert len(list(csv.DictReader(io.StringIO(capsys.readouterr().out)))) == 3
    for suffix in ("parquet", "csv", "json"):
        path = tmp_path / f"rows.{suffix}"
        assert cli("query", "by_lora", "--param", "lora=detail", "--out", str(path), "--output", str(output)) == 0
        assert f"3 rows of by_lora written to {path}" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "rows.parquet").column("image_id").to_pylist() == ids(7, 8, 10)
    assert [r["image_id"] for r in json.loads((tmp_path / "rows.json").read_text())] == ids(7, 8, 10)
    assert cli("query", "runs", "--out", str(tmp_path / "rows.txt"), "--output", str(output)) == 2
    assert "name a .parquet, .csv or .json file" in capsys.readouterr().err
    assert cli("query", "runs", "--all", "--limit", "1", "--output", str(output)) == 2
    assert "give --all or --limit, not both" in capsys.readouterr().err


def test_count_and_export_of_a_named_query(con, tmp_path):
    from analysis.queries import count_query, export_query

    assert count_query(con, "by_lora", {"lora": "style"}) == len(run_query(con, "by_lora", {"lora": "style"})[1])
    n = export_query(con, "by_lora", str(tmp_path / "p.csv"), {"lora": "style"}, limit=2, offset=1)
    assert n == 2 and len(list(csv.DictReader((tmp_path / "p.csv").open()))) == 2


def test_every_named_query_counts_its_rows_without_its_final_order(con):
    from analysis.queries import _sql, _unordered, count_query

    for name, query in QUERIES.items():
        assert "ORDER BY" not in _unordered(_sql(query)).rsplit(")", 1)[-1], name
        params = {p.name: "style" if p.kind == "text" else "2026-12" for p in query.params if p.required}
        assert count_query(con, name, params) == len(run_query(con, name, params)[1]), name
    # a final clause that is more than an order is kept whole
    assert _unordered("SELECT 1 ORDER BY 1 LIMIT 5") == "SELECT 1 ORDER BY 1 LIMIT 5"
    assert _unordered("SELECT x FROM t ORDER BY f(x)") == "SELECT x FROM t ORDER BY f(x)"
    assert _unordered("SELECT x FROM t\nORDER BY x DESC, y") == "SELECT x FROM t"


def test_report_bins_scores_and_thins_the_throughput_curve_in_duckdb(output, monkeypatch):
    import numpy as np

    from analysis import report

    con = analysis.connect(str(output), search_index=False)
    con.execute(f"CREATE TEMP TABLE scope AS SELECT {', '.join(report.SCOPE_COLUMNS)} FROM images")
    bins = report._score_bins(con)
    for score in report.SCORES:
        edges, counts = bins[score]
        for outcome, got in counts.items():
            values = [
                v
                for (v,) in con.execute(
                    f"SELECT {score} FROM scope WHERE outcome = $o AND {score} IS NOT NULL", {"o": outcome}
                ).fetchall()
            ]
            assert got == np.histogram(values, bins=edges)[0].tolist(), (score, outcome)
    # Every row of a small run; a large run thinned to about CURVE_POINTS, its last point its total.
    full = report._throughput(con, runs=3)
    sizes = dict(con.execute("SELECT run_id, count(*) FROM scope GROUP BY ALL").fetchall())
    assert {r: s[1] for r, s in full.items()} == {r: list(range(1, n + 1)) for r, n in sizes.items()}
    monkeypatch.setattr(report, "CURVE_POINTS", 0)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE scope AS SELECT 'big' AS run_id, TIMESTAMPTZ '2026-12-01' "
        "+ to_seconds(range) AS created_at FROM range(10000)"
    )
    ((_times, written),) = report._throughput(con, runs=1).values()
    assert len(written) <= 52 and written[0] == 1 and written[-1] == 10_000 and written == sorted(written)


def test_report_leaves_the_search_index_alone(tmp_path):
    from analysis.report import build_report

    out = make_output(str(tmp_path))
    build_report(out, max_thumbs=1)
    assert not (tmp_path / "indexes").exists()
