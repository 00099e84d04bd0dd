"""Full-text search: BM25 in plain SQL, checked against DuckDB's fts extension."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import analysis
from app.catalog.store import CatalogStore
from app.storage import OutputStore

DOCS = [
    (
        "d1",
        "studio photo of a red leather boot, soft light",
        "text, watermark, blurry",
        {"category": "footwear", "campaign": "autumn"},
    ),
    ("d2", "red wool scarf on a red chair", "text, watermark", {"category": "accessory", "campaign": "autumn"}),
    ("d3", "blue cotton tote bag", "blurry", {"category": "bag"}),
    ("d4", "leather belt with a brass buckle", "", {"category": "accessory"}),
    ("d5", "ceramic mug, white, studio light", "text", {"category": "kitchen", "campaign": "winter"}),
]
# The same documents indexed by DuckDB 1.5.5's fts extension (duckdb-extension-fts 1.5.5:
# create_fts_index('docs', 'id', 'prompt', 'negative_prompt', 'tags', stemmer='none',
# stopwords='none'); fts_main_docs.match_bm25(id, query, fields := …)). The words above have no
# plural endings, so this search's plural folding changes nothing and the scores must agree.
FTS_1_5_5 = {
    ("red leather boot", ""): [("d1", 1.1228275769122056), ("d2", 0.49552321521203524), ("d4", 0.42143896671647896)],
    ("red", ""): [("d2", 0.49552321521203524), ("d1", 0.3133336943095646)],
    ("studio light", ""): [("d5", 0.8032855461631427), ("d1", 0.6266673886191292)],
    ("accessory leather", ""): [("d4", 0.8428779334329579), ("d2", 0.3520345623166929), ("d1", 0.3133336943095646)],
    ("blurry", ""): [("d3", 0.44328776107390017), ("d1", 0.3133336943095646)],
    ("blurry", "prompt"): [],
    ("red leather", "prompt,tags"): [
        ("d1", 0.6266673886191292),
        ("d2", 0.49552321521203524),
        ("d4", 0.42143896671647896),
    ],
}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    rows = [
        {
            "image_id": i,
            "status": "accepted",
            "created_at": datetime(2026, 12, 1, tzinfo=UTC),
            "prompt": p,
            "negative_prompt": n,
            "tags": t,
        }
        for i, p, n, t in DOCS
    ]
    CatalogStore(OutputStore.at(str(root))).append(rows, run_id="r1", date="2026-12-01")
    return root


@pytest.fixture(scope="module")
def con(output):
    return analysis.connect(str(output))


@pytest.mark.parametrize("query, fields", list(FTS_1_5_5))
def test_scores_match_the_fts_extension(con, query, fields):
    _columns, rows = analysis.search(
        con, query, fields=tuple(fields.split(",")) if fields else (), columns=("image_id", "score")
    )
    # search() rounds scores for display; the macro gives them whole
    exact = con.execute(
        "SELECT image_id, score FROM search_images($q, fields := $f)", {"q": query, "f": fields or None}
    ).fetchall()
    expected = FTS_1_5_5[(query, fields)]
    assert [i for i, _ in exact] == [i for i, _ in expected] == [r[0] for r in rows]
    assert [s for _, s in exact] == pytest.approx([s for _, s in expected], rel=1e-12)


def test_tokens_fold_case_accents_and_plurals(con):
    (tokens,) = con.execute("SELECT imagefab_tokens('Crème BRÛLÉE: Boots, accessories, glass; P-0003')").fetchone()
    assert tokens == ["creme", "brulee", "boot", "accessory", "glass", "p", "0003"]
    # "boots" finds the boot, "accessories" the accessories
    assert analysis.search(con, "boots", columns=("image_id",))[1] == [("d1",)]
    assert sorted(r[0] for r in analysis.search(con, "Accessories", columns=("image_id",))[1]) == ["d2", "d4"]


def test_all_terms_and_limit(con):
    assert [r[0] for r in analysis.search(con, "red leather", all_terms=True, columns=("image_id",))[1]] == ["d1"]
    assert len(analysis.search(con, "red leather boot", limit=2)[1]) == 2


def test_search_cli_on_a_real_shaped_catalog(tmp_path, capsys):
    from analysis_catalog import cli, image_id, make_output

    make_output(str(tmp_path))
    assert cli("search", "red leather boot", "--limit", "3", "--output", str(tmp_path), "--format", "json") == 0
    import json

    hits = json.loads(capsys.readouterr().out)
    # P-2 "red leather boots" has all three words; P-1's two images "leather ankle boot" two
    assert hits[0]["image_id"] == image_id(2) and {h["image_id"] for h in hits[1:]} == {image_id(1), image_id(10)}
    assert hits[0]["score"] > hits[1]["score"] > 0 and hits[0]["tags"]["product_id"] == "P-2"
    assert cli("search", "SKU-3", "--field", "tags", "--all-terms", "--output", str(tmp_path), "--format", "json") == 0
    assert [h["image_id"] for h in json.loads(capsys.readouterr().out)] == [image_id(3)]
