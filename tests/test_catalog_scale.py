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
