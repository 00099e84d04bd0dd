"""The views, review decisions, cost and report on object storage: S3 over real HTTP on loopback
(moto's server), read through OutputStore's pyarrow filesystem — DuckDB needs no httpfs."""

from __future__ import annotations

import pytest
from analysis_catalog import image_id, make_output
from moto_s3 import loopback_s3

import analysis
from analysis.cost import cost_report
from analysis.report import build_report
from app.cost import PriceTable
from app.review import decide, pending_review

pytest.importorskip("moto.server")  # before the fixtures, so the whole module skips without moto


@pytest.fixture(scope="module")
def s3_output():
    with loopback_s3("shop"):
        make_output("s3://shop/outputs")
        yield "s3://shop/outputs"


def test_views_decisions_cost_and_report_over_s3(s3_output):
    con = analysis.connect(s3_output, file_sizes=True)
    got = dict(con.execute("SELECT outcome, count(*) FROM images GROUP BY ALL").fetchall())
    assert got == {"accepted": 7, "review": 2, "rejected": 2, "failed": 1}
    (masters,) = con.execute("SELECT count(master_bytes) FROM images").fetchone()
    assert masters == 11  # every rendered image's master was listed on the bucket

    decide(s3_output, [image_id(5)], "approved", "alice")
    assert [r["image_id"] for r in pending_review(s3_output)] == [image_id(7)]
    con = analysis.connect(s3_output)
    assert con.execute("SELECT approval FROM images WHERE image_id = $i", {"i": image_id(5)}).fetchone() == (
        "approved",
    )

    report = cost_report(analysis.connect(s3_output, file_sizes=True), PriceTable())
    assert report.accepted == 8 and report.master_bytes > 0

    html = build_report(s3_output, max_thumbs=4)
    assert html.count('src="data:image/webp;base64,') == 4 + 1 + 2  # 4 of 8 accepted, 1 review, 2 rejected
