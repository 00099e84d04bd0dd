"""The soak benchmark's memory verdict: an RSS series per process and its slope over the last half."""

from __future__ import annotations

import pytest

from benchmarks.soak import Minute, late_slopes, markdown, rss_series, slope_per_min


def test_slope_is_the_least_squares_rate_per_minute():
    assert slope_per_min([(0, 5.0), (1, 7.0), (2, 9.0)]) == pytest.approx(2.0)
    assert slope_per_min([(0, 3.0), (1, 5.0), (2, 3.0), (3, 5.0)]) == pytest.approx(0.4)
    assert slope_per_min([(4, 1.0)]) is None


def test_rss_series_starts_at_the_hold_and_the_slope_reads_only_its_last_half():
    start = {"ingress": 900.0, "proxy": 200.0, "gone": 50.0}
    minutes = [
        Minute(i, rss_mb={"ingress": 900.0 + 10 * min(i + 1, 2), "proxy": 200.0, "gone": None}) for i in range(6)
    ]
    series = rss_series(start, minutes)
    assert series["ingress"] == [900.0, 910.0, 920.0, 920.0, 920.0, 920.0, 920.0]
    assert series["gone"] == [50.0, None, None, None, None, None, None]
    slopes = late_slopes(series)
    # A warm-up of 20 MB in the first two minutes, then flat: the last half (minutes 3-6) says 0 KB/min.
    assert slopes["ingress"] == pytest.approx(0.0)
    assert slopes["proxy"] == pytest.approx(0.0)
    assert slopes["gone"] is None
    growing = late_slopes({"leaky": [900.0 + 0.5 * i for i in range(11)]})
    assert growing["leaky"] == pytest.approx(512.0)  # 0.5 MB a minute


def test_markdown_shows_the_slope_beside_the_growth():
    result = {
        "kind": "serve",
        "minutes": [{"minute": 0, "sent": 10, "ok": 10, "errors": {}, "p50_s": 0.2, "p99_s": 0.4, "load_avg_1m": 1.0}],
        "rss_growth": {"ingress": {"start_mb": 900.0, "end_mb": 901.0, "growth_mb": 1.0}},
        "rss_slope_last_half_kb_per_min": {"ingress": 12.4},
    }
    text = markdown(result)
    assert "slope, last half (KB/min)" in text
    assert "| ingress | 900 | 901 | +1.0 | +12 |" in text
