"""The persistent search index: the plain macro's scores exactly, kept up to date incrementally."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import pytest

import analysis
from analysis.search_index import FORMAT, INDEX_DIR, MAX_SEGMENTS
from app.catalog.compact import compact
from app.catalog.store import CatalogStore
from app.storage import OutputStore

WORDS = [
    "red",
    "blue",
    "leather",
    "wool",
    "boot",
    "boots",
    "scarf",
    "tote",
    "bag",
    "belt",
    "mug",
    "studio",
    "light",
    "soft",
    "accessories",
]
QUERIES = [
    ("red leather boot", None, False),
    ("boots", "prompt", False),
    ("studio light", None, True),
    ("mug", "tags", False),
]


def _append(store: CatalogStore, rng: random.Random, n: int, run_id: str, start: int, when: datetime) -> None:
    rows = [
        {
            "image_id": f"img{start + i:05d}",
            "status": rng.choice(["accepted", "review", "rejected", "failed"]),
            "created_at": when + timedelta(seconds=i),
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(0, 6))),
            "negative_prompt": rng.choice(["", "blurry", "text, watermark"]),
            "tags": {"category": rng.choice(["bag", "mug", "boot"])} if rng.random() < 0.8 else {},
        }
        for i in range(n)
    ]
    store.append(rows, run_id=run_id, date=f"{when:%Y-%m-%d}")


def _results(output, index: bool) -> list:
    con = analysis.connect(output, search_index=index)
    return [
        con.execute(
            "SELECT image_id, score FROM search_images($q, fields := $f, conjunctive := $c)",
            {"q": q, "f": f, "c": c},
        ).fetchall()
        for q, f, c in QUERIES
    ]


def _same(a: list, b: list) -> None:
    assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [s for _, s in ra] == pytest.approx([s for _, s in rb], rel=1e-12)


@pytest.fixture()
def catalog(tmp_path):
    rng = random.Random(7)
    store = CatalogStore(OutputStore.at(str(tmp_path)))
    t = datetime(2026, 12, 1, tzinfo=UTC)
    for b in range(6):
        _append(store, rng, 5, "r1", b * 5, t)
    for b in range(3):
        _append(store, rng, 5, "r2", 100 + b * 5, t + timedelta(days=1))
    # a rerun writes a later row for some ids of r1: the latest row per image is the one searched
    _append(store, rng, 5, "r3", 0, t + timedelta(days=2))
    return tmp_path, store, rng


def test_index_scores_equal_the_plain_macro_and_persist(catalog):
    root, _store, _rng = catalog
    plain = _results(str(root), index=False)
    assert any(plain)
    _same(_results(str(root), index=True), plain)
    manifest = json.loads((root / INDEX_DIR / "manifest.json").read_text())
    assert len(manifest["files"]) == 10 and len(manifest["segments"]) == 1
    assert sorted(manifest["segment_files"][manifest["segments"][0]]) == sorted(manifest["files"].values())
    # a second connection finds everything indexed and writes nothing
    before = sorted(p.name for p in (root / INDEX_DIR).iterdir())
    _same(_results(str(root), index=True), plain)
    assert sorted(p.name for p in (root / INDEX_DIR).iterdir()) == before


def test_new_batches_and_compaction_update_the_index(catalog):
    root, store, rng = catalog
    _results(str(root), index=True)
    _append(store, rng, 5, "r4", 500, datetime(2026, 12, 5, tzinfo=UTC))
    _same(_results(str(root), index=True), _results(str(root), index=False))
    manifest = json.loads((root / INDEX_DIR / "manifest.json").read_text())
    assert len(manifest["segments"]) == 2  # only the new file was tokenized
    compact(str(root))
    _same(_results(str(root), index=True), _results(str(root), index=False))
    manifest = json.loads((root / INDEX_DIR / "manifest.json").read_text())
    live = {p[len(store.base) + 1 :] for p in store.live_files()}
    assert (
        set(manifest["files"]) == live and sum("/compacted-" in f for f in live) == 2
    )  # r1, r2 (r3, r4: one file each)


def test_segments_merge(catalog):
    root, store, rng = catalog
    _results(str(root), index=True)
    for i in range(MAX_SEGMENTS + 1):
        _append(store, rng, 2, "r5", 900 + i * 2, datetime(2026, 12, 9, tzinfo=UTC))
        _results(str(root), index=True)
    manifest = json.loads((root / INDEX_DIR / "manifest.json").read_text())
    assert len(manifest["segments"]) <= MAX_SEGMENTS
    segment_files = {p.name.split(".")[0] for p in (root / INDEX_DIR).glob("seg-*")}
    assert segment_files == set(manifest["segments"])  # merged segments are deleted
    _same(_results(str(root), index=True), _results(str(root), index=False))


def test_an_output_that_cannot_take_the_index_still_searches(catalog):
    root, _store, _rng = catalog
    (root / "indexes").mkdir()
    (root / INDEX_DIR).write_text("a file where the index folder would go")  # every index write fails
    _same(_results(str(root), index=True), _results(str(root), index=False))


def test_search_pages_from_the_index_equal_the_plain_ranking(catalog):
    root, _store, _rng = catalog
    indexed = analysis.connect(str(root), search_index=True)
    plain = analysis.connect(str(root), search_index=False)
    for q, f, c in QUERIES:
        fields = tuple(f.split(",")) if f else ()
        for limit in (1, 3, 50):
            got = analysis.search(indexed, q, limit=limit, fields=fields, all_terms=c, columns=("image_id", "score"))
            want = analysis.search(plain, q, limit=limit, fields=fields, all_terms=c, columns=("image_id", "score"))
            assert got == want


def test_an_index_in_an_older_format_is_rebuilt(catalog):
    root, _store, _rng = catalog
    plain = _results(str(root), index=False)
    _results(str(root), index=True)
    manifest_path = root / INDEX_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old_segments = set(manifest["segments"])
    del manifest["format"]  # as the first release wrote it (postings without lengths)
    manifest_path.write_text(json.dumps(manifest))
    _same(_results(str(root), index=True), plain)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == FORMAT and not old_segments & set(manifest["segments"])
    assert {p.name.split(".")[0] for p in (root / INDEX_DIR).glob("seg-*")} == set(manifest["segments"])
