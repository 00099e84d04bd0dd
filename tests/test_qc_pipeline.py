"""The full QC inside the bulk job: near-duplicates within a run and against the catalog, scores
in the catalog, rejection reasons countable with one DuckDB query."""

from __future__ import annotations

import textwrap

import duckdb
import pytest

from app.catalog.store import CatalogStore
from app.spec import load_spec
from app.storage import OutputStore

pytestmark = pytest.mark.ray

# A LoRA at weight 0 renders exactly the base image, but is a different request (another id):
# the pixels are the same, so QC must call it a duplicate. (The random-weight tiny model barely
# listens to prompts, so the unrelated image `c` differs by its seed, not its prompt.)
ROWS = """\
key,prompt,loras,seed
a,a red leather boot,,
b,a red leather boot,tiny-style:0,
c,a blue canvas tote,,977
"""


def test_duplicates_within_the_run_and_against_the_catalog(ray_local, tmp_path):
    from jobs.generate import run

    (tmp_path / "rows.csv").write_text(ROWS)
    (tmp_path / "job.yaml").write_text(
        textwrap.dedent("""\
        run_name: qc-dupes
        input: {path: rows.csv, prompt_column: prompt, key_column: key}
        tags: [key]
        variations: {seeds_per_row: 1, seed_mode: fixed, base_seed: 3}
        size: tiny-square
        steps: 2
        compute: {batch_size: 4}
    """)
    )
    out = tmp_path / "out"
    first = run(load_spec(tmp_path / "job.yaml", {"output.uri": str(out)}), quiet=True)
    assert first.rendered == 3
    rows = {dict(r["tags"])["key"]: r for r in CatalogStore(OutputStore.at(str(out))).read().to_pylist()}
    assert all(r["phash"] and len(r["phash"]) == 16 for r in rows.values())
    assert rows["a"]["phash"] == rows["b"]["phash"]
    flagged = [k for k in ("a", "b") if any(x.startswith("duplicate_of:") for x in rows[k]["reasons"])]
    assert len(flagged) == 1, {k: r["reasons"] for k, r in rows.items()}
    dup, kept = rows[flagged[0]], rows[({"a", "b"} - set(flagged)).pop()]
    assert dup["status"] == "rejected" and f"duplicate_of:{kept['image_id']}" in dup["reasons"]
    assert dup["nearest_duplicate"] == kept["image_id"]
    assert rows["c"]["nearest_duplicate"] is None
    assert dict(rows["c"]["qc_scores"])["sharpness"] == rows["c"]["sharpness"]
    assert "color_cast" in dict(rows["c"]["qc_scores"]) and rows["c"]["qc_version"].startswith("qc2-")

    # A later run: the same pixels again under yet another id are a duplicate of the catalogued image.
    (tmp_path / "rows.csv").write_text("key,prompt,loras,seed\nd,a red leather boot,tiny-detail:0,\n")
    run(load_spec(tmp_path / "job.yaml", {"output.uri": str(out)}), quiet=True)
    d = next(r for r in CatalogStore(OutputStore.at(str(out))).read().to_pylist() if dict(r["tags"])["key"] == "d")
    assert d["status"] == "rejected" and d["nearest_duplicate"] == kept["image_id"]

    # Rejection reasons of a run, counted with one query.
    counts = dict(
        duckdb.connect()
        .execute(
            f"SELECT split_part(reason, ':', 1) AS reason, count(*) FROM "
            f"(SELECT unnest(reasons) AS reason FROM read_parquet('{out}/catalog/**/*.parquet', hive_partitioning=true)) "
            f"GROUP BY ALL"
        )
        .fetchall()
    )
    assert counts["duplicate_of"] == 2
