"""benchmarks.catalog_scale at a small size: it writes, times, compacts and times again, on local
disk and on loopback S3, and every step it reports ran on the whole catalog."""

from __future__ import annotations

import json

import pytest

from analysis.queries import QUERIES
from benchmarks.catalog_scale import main


def test_catalog_scale_small(tmp_path, capsys):
    pytest.importorskip("moto.server")
    out = tmp_path / "r.json"
    assert main(["--images", "24", "--per-run", "12", "--batch", "4", "--s3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["where"] for r in results] == ["local disk", "S3 (moto on loopback)"]
    for r in results:
        assert (r["images"], r["files"], r["runs"]) == (24, 6, 2)
        assert r["compaction"]["files_in"] == 6 and r["compaction"]["rows"] == 24
        steps = {f"query {q}" for q in QUERIES} | {"connect", "search", "search (2nd)", "report", "review list"}
        assert set(r["before"]) == set(r["after"]) == steps
    assert "| query runs |" in capsys.readouterr().out


def test_catalog_pass_times_every_step_of_an_existing_catalog(tmp_path, capsys):
    from app.catalog.compact import compact
    from app.storage import OutputStore
    from benchmarks.catalog_pass import main as pass_main
    from benchmarks.catalog_scale import write_catalog

    write_catalog(OutputStore.at(str(tmp_path / "out")), 24, 4, 12)
    compact(str(tmp_path / "out"))
    out = tmp_path / "pass.json"
    assert pass_main([str(tmp_path / "out"), str(out)]) == 0
    result = json.loads(out.read_text())
    steps = {f"query {q}" for q in QUERIES} | {"connect", "search", "search (2nd)", "report"}
    assert steps | {"review list", "review list (2nd)"} == set(result)  # 24 rows: no query exceeds a page
    assert all(r["wall_s"] >= 0 and r["cpu_s"] >= 0 and r["load"] >= 0 for r in result.values())
    assert "query runs:" in capsys.readouterr().out
    assert pass_main([]) == 2
