"""Near-duplicates: pHash of real photographs and their copies, and the multi-index at 100k hashes."""

from __future__ import annotations

import pickle
import re
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
from photos import photo
from PIL import Image

from app.qc import DuplicateMatch, PhashIndex, QcSettings, evaluate_batch, hamming, perceptual_hash
from app.qc.duplicates import hash_to_int
from benchmarks.qc_eval import crop, half_size, jpeg  # the variants the precision/recall table uses

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")
SETTINGS = QcSettings()


# --- hashes -------------------------------------------------------------------------------------


def test_hash_is_16_hex_characters_and_input_kinds_agree() -> None:
    pixels = photo("astronaut")
    value = perceptual_hash(pixels)
    # The catalog keeps hashes, and later runs compare new images with them: the same photo must
    # keep its hash (a change of algorithm or library would silently miss duplicates).
    assert value == "c2924c5532bddfc8"
    assert perceptual_hash(Image.fromarray(pixels)) == value
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)])
    assert perceptual_hash(rgba) == value
    assert hash_to_int(value) == int(value, 16)


@pytest.mark.parametrize("name", PHOTOS)
def test_hash_sets_half_its_bits(name: str) -> None:
    """pHash thresholds an image's 64 lowest DCT frequencies at their median: 32 above it."""
    value = perceptual_hash(photo(name))
    assert re.fullmatch(r"[0-9a-f]{16}", value), value
    assert hash_to_int(value).bit_count() == 32, value


@pytest.mark.parametrize("bad", ["xyz", "0123456789abcdeg", "0" * 15, -1, 1 << 64, 1.5, None, True])
def test_bad_hashes_name_the_value(bad) -> None:
    with pytest.raises(ValueError, match="pHash"):
        hash_to_int(bad)


@pytest.mark.parametrize("name", PHOTOS)
def test_copies_are_close_and_other_photos_far(name: str) -> None:
    original = perceptual_hash(photo(name))
    for copy in (jpeg(photo(name), 70), half_size(photo(name))):
        assert hamming(original, perceptual_hash(copy)) <= SETTINGS.max_duplicate_distance
    assert hamming(original, perceptual_hash(crop(photo(name), 0.02))) <= SETTINGS.review_duplicate_distance
    for other in PHOTOS:
        if other != name:
            assert hamming(original, perceptual_hash(photo(other))) > SETTINGS.review_duplicate_distance + 6


# --- the index on real photos through evaluate_batch ----------------------------------------------


def test_within_a_batch_the_first_is_kept_and_later_copies_are_duplicates() -> None:
    index = PhashIndex()
    astronaut, coffee = photo("astronaut"), photo("coffee")
    images = [astronaut, coffee, jpeg(astronaut, 70), half_size(coffee), crop(astronaut, 0.02)]
    ids = ["a", "c", "a-jpeg", "c-half", "a-crop"]
    verdicts = evaluate_batch(images, [None] * 5, SETTINGS, duplicates=index, image_ids=ids)

    assert [v.status for v in verdicts[:2]] == ["accepted", "accepted"]
    assert verdicts[2].status == "rejected" and verdicts[2].reasons == ("duplicate_of:a",)
    assert verdicts[3].reasons == ("duplicate_of:c",)
    assert verdicts[2].nearest_duplicate == "a" and verdicts[2].scores["duplicate_distance"] <= 6
    # The crop is a duplicate or a near one by its distance from the original's hash.
    crop_verdict, crop_distance = verdicts[4], hamming(verdicts[0].phash, verdicts[4].phash)
    assert crop_verdict.nearest_duplicate == "a" and crop_verdict.scores["duplicate_distance"] == crop_distance
    if crop_distance <= SETTINGS.max_duplicate_distance:
        assert (crop_verdict.status, crop_verdict.reasons) == ("rejected", ("duplicate_of:a",))
    else:
        assert crop_distance <= SETTINGS.review_duplicate_distance
        assert (crop_verdict.status, crop_verdict.reasons) == ("review", ("near_duplicate_of:a",))
    # the originals went into the index, the rejected copies did not
    assert len(index) == 2 + (crop_verdict.status != "rejected")
    assert all(v.phash and len(v.phash) == 16 for v in verdicts)


def test_review_band_reports_near_duplicates() -> None:
    index = PhashIndex()
    settings = QcSettings(max_duplicate_distance=0, review_duplicate_distance=10)
    astronaut = photo("astronaut")
    first, second = evaluate_batch(
        [astronaut, crop(astronaut, 0.03)], [None, None], settings, duplicates=index, image_ids=["a", "b"]
    )
    assert first.status == "accepted"
    assert second.status == "review" and second.reasons == ("near_duplicate_of:a",)
    assert "b" in index  # kept, so indexed


def test_images_rejected_for_other_reasons_are_not_indexed() -> None:
    index = PhashIndex()
    black = np.zeros((256, 256, 3), np.uint8)
    astronaut = photo("astronaut")
    verdicts = evaluate_batch([black, astronaut], [None, None], SETTINGS, duplicates=index, image_ids=["black", "a"])
    assert verdicts[0].reasons[0] == "blank"
    assert "black" not in index and "a" in index


def test_a_shared_index_sees_earlier_batches_and_ids_are_required() -> None:
    index = PhashIndex()
    evaluate_batch([photo("coins")], [None], SETTINGS, duplicates=index, image_ids=["coins-1"])
    (later,) = evaluate_batch([jpeg(photo("coins"), 70)], [None], SETTINGS, duplicates=index, image_ids=["coins-2"])
    assert later.reasons == ("duplicate_of:coins-1",)
    with pytest.raises(ValueError, match="image_ids"):
        evaluate_batch([photo("coins")], [None], SETTINGS, duplicates=index)


def test_disabled_duplicate_check_neither_hashes_nor_queries() -> None:
    index = PhashIndex()
    settings = QcSettings(enabled=("sharpness", "contrast"))
    (verdict,) = evaluate_batch([photo("camera")], [None], settings, duplicates=index, image_ids=["x"])
    assert verdict.phash is None and len(index) == 0


# --- index mechanics -----------------------------------------------------------------------------


def test_nearest_and_query_and_add_semantics() -> None:
    index = PhashIndex()
    assert index.nearest(0, 10) is None
    index.add("first", 0)
    index.add("first", (1 << 64) - 1)  # an id is indexed once: the first hash stays
    assert index.nearest(0b111, 10) == DuplicateMatch("first", 3)
    assert index.nearest(0b111, 2) is None
    assert index.nearest(0, 10, exclude_id="first") is None

    # ties go to the earliest added; a re-checked image never finds itself
    index.add("second", 0b11)
    index.add("third", 0b1100)
    assert index.nearest(0b1111, 5) == DuplicateMatch("second", 2)
    assert index.query_and_add("first", 0, 10) == DuplicateMatch("second", 2)
    assert len(index) == 3

    assert index.query_and_add("dup", 0b1, 10, reject_distance=6) == DuplicateMatch("first", 1)
    assert "dup" not in index  # within the reject distance: its original is indexed already
    assert index.query_and_add("near", 0xFF00, 10, reject_distance=6) == DuplicateMatch("first", 8)
    assert "near" in index  # a near-duplicate is kept, so it is indexed
    assert index.query_and_add("ineligible", (1 << 40) - 1, 10, eligible=False) is None
    assert "ineligible" not in index


def test_query_and_add_many_checks_lengths() -> None:
    index = PhashIndex()
    with pytest.raises(ValueError, match="2 image ids but 1 hashes"):
        index.query_and_add_many(["a", "b"], [0], 10)
    with pytest.raises(ValueError, match="eligible"):
        index.query_and_add_many(["a"], [0], 10, eligible=[True, False])
    with pytest.raises(ValueError, match="bands"):
        PhashIndex(bands=1)


def brute_force(hashes: np.ndarray, query: int, max_distance: int) -> tuple[int, int] | None:
    distances = np.bitwise_count(hashes ^ np.uint64(query))
    best = int(np.argmin(distances))
    return (best, int(distances[best])) if distances[best] <= max_distance else None


def flip_bits(value: int, count: int, rng: np.random.Generator) -> int:
    for bit in rng.choice(64, size=count, replace=False):
        value ^= 1 << int(bit)
    return value


def test_100k_hashes_with_planted_near_duplicates_match_a_full_scan() -> None:
    rng = np.random.default_rng(7)
    count = 100_000
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    index = PhashIndex()
    start = time.perf_counter()
    index.add_many([f"img-{i}" for i in range(count)], hashes.tolist())
    build_s = time.perf_counter() - start

    # planted: copies of indexed hashes with 0..12 bits flipped; plus random queries
    planted = [(int(rng.integers(count)), int(rng.integers(0, 13))) for _ in range(300)]
    queries = [flip_bits(int(hashes[row]), bits, rng) for row, bits in planted]
    queries += [int(v) for v in rng.integers(0, 2**64, size=300, dtype=np.uint64)]
    for max_distance in (6, 10):
        start = time.perf_counter()
        found = [index.nearest(q, max_distance) for q in queries]
        per_query_ms = (time.perf_counter() - start) / len(queries) * 1000
        for query, match in zip(queries, found):
            expected = brute_force(hashes, query, max_distance)
            if expected is None:
                assert match is None
            else:
                assert match is not None and match.distance == expected[1]
        for (_, bits), match in zip(planted, found):
            if bits <= max_distance:
                assert match is not None and match.distance <= bits  # the planted one or a closer one
        # the point of the multi-index: a query looks at a sliver of the rows
        candidates = np.mean([index.candidates(q, max_distance).size for q in queries[:100]])
        assert candidates < count / 50, candidates
        print(f"r={max_distance}: {per_query_ms:.3f} ms/query, {candidates:.0f} candidates of {count}")
    print(f"build {build_s:.2f} s for {count} hashes")
    assert build_s < 10


def test_additions_after_a_bulk_load_are_found_before_and_after_merging() -> None:
    rng = np.random.default_rng(3)
    index = PhashIndex()
    base = rng.integers(0, 2**64, size=20_000, dtype=np.uint64)
    index.add_many([f"b{i}" for i in range(base.size)], base.tolist())
    late = rng.integers(0, 2**64, size=PhashIndex.MIN_BUFFER + 10, dtype=np.uint64)  # forces a merge
    for i, value in enumerate(late.tolist()):
        index.add(f"l{i}", value)
        if i in (0, 100, PhashIndex.MIN_BUFFER + 5):
            assert index.nearest(flip_bits(value, 3, rng), 6) == DuplicateMatch(f"l{i}", 3)
    assert index.nearest(int(base[5]), 0) == DuplicateMatch("b5", 0)


def test_index_pickles_for_ray() -> None:
    index = PhashIndex()
    index.add_many(["a", "b"], ["c2924c5532bddfc8", "bb8320376c0f3637"])
    index.nearest(0, 10)  # fills the probe cache, which must pickle too
    copy = pickle.loads(pickle.dumps(index))
    assert copy.nearest("c2924c5532bddfc9", 6) == DuplicateMatch("a", 1)
    assert len(copy) == 2
    # merged into the bucket tables too
    many = np.random.default_rng(0).integers(0, 2**64, size=PhashIndex.MIN_BUFFER * 2, dtype=np.uint64)
    index.add_many([f"r{i}" for i in range(many.size)], many.tolist())
    copy = pickle.loads(pickle.dumps(index))
    assert copy.nearest(int(many[-1]) ^ 0b101, 6) == DuplicateMatch(f"r{many.size - 1}", 2)
    assert copy.nearest("c2924c5532bddfc9", 6) == DuplicateMatch("a", 1)


def test_from_catalog_skips_undelivered_rows_and_keeps_the_oldest() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    table = pa.table(
        {
            "image_id": ["new", "old", "bad", "nohash", "failed"],
            "phash": ["00000000000000ff", "00000000000000ff", "0000000000000000", None, "0000000000000001"],
            "status": ["accepted", "review", "rejected", "accepted", "failed"],
            "created_at": [now, now - timedelta(days=1), now, now, now],
        }
    )
    index = PhashIndex.from_catalog(table)
    assert len(index) == 2 and "bad" not in index and "failed" not in index
    # the same hash twice: the older row is the original
    assert index.nearest("00000000000000ff", 0) == DuplicateMatch("old", 0)
    assert index.nearest("0000000000000000", 10) == DuplicateMatch("old", 8)
    with pytest.raises(ValueError, match="phash"):
        PhashIndex.from_catalog(pa.table({"image_id": ["a"]}))


def test_siblings_of_one_group_are_never_duplicates_of_each_other():
    index = PhashIndex()
    h = "b34c5a33b3a9a515"
    assert index.query_and_add("a1", h, 10, reject_distance=6, group="g1") is None
    assert index.query_and_add("a2", h, 10, reject_distance=6, group="g1") is None  # same A/B group
    match = index.query_and_add("b1", h, 10, reject_distance=6, group="g2")  # another group: a duplicate
    assert match is not None and match.image_id == "a1" and match.distance == 0
    assert index.nearest(h, 10).image_id == "a1"  # no group: every image counts
