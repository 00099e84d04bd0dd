"""Style consistency: references from a folder, distances to their centroid, which key applies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from skimage import data as skdata

from app.qc import QcModels, QcSettings, StyleReference, evaluate, evaluate_batch, hamming, style_key_for
from app.qc.clip import TINY_MODEL, ClipScorer
from app.qc.clip_measures import ClipMeasure, cosine

PHOTOS = {name: getattr(skdata, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(TINY_MODEL, None, device="cpu")


@pytest.fixture
def reference_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "brand-acme"
    folder.mkdir()
    for name, pixels in PHOTOS.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_reference_from_a_folder(scorer: ClipScorer, reference_folder: Path) -> None:
    reference = StyleReference.from_folder("brand=acme", reference_folder, scorer)
    assert reference.sources == ("astronaut.png", "chelsea.png", "coffee.png", "rocket.png")
    assert reference.model_id == scorer.model_id
    assert np.linalg.norm(reference.centroid) == pytest.approx(1.0, abs=1e-6)
    embeddings = scorer.embed_images([PHOTOS[n] for n in ("astronaut", "chelsea", "coffee", "rocket")])
    np.testing.assert_allclose(reference.centroid, embeddings.mean(0) / np.linalg.norm(embeddings.mean(0)), atol=1e-6)
    # each reference's own distance, as the distance function computes it
    own = reference.distances(embeddings, scorer.model_id)
    np.testing.assert_allclose(own, reference.reference_distances, atol=1e-6)
    assert len(reference.phashes) == 4 and reference.median_phash_distance(reference.phashes[0]) > 0
    # the digest follows the pixels
    Image.fromarray(PHOTOS["rocket"][::-1]).save(reference_folder / "rocket.png")
    assert StyleReference.from_folder("brand=acme", reference_folder, scorer).digest != reference.digest


def test_style_distance_is_one_minus_cosine_to_the_centroid(scorer: ClipScorer) -> None:
    coffee = PHOTOS["coffee"]
    single = StyleReference.from_images("one", [coffee], scorer)
    assert single.distances(scorer.embed_images([coffee]), scorer.model_id)[0] == pytest.approx(0.0, abs=1e-6)
    other = scorer.embed_images([PHOTOS["astronaut"]])
    expected = 1.0 - cosine(other[0], scorer.embed_images([coffee])[0])
    assert single.distances(other, scorer.model_id)[0] == pytest.approx(expected, abs=1e-6)
    assert single.median_phash_distance(single.phashes[0]) == 0.0


def test_references_refuse_embeddings_from_another_model(scorer: ClipScorer) -> None:
    reference = StyleReference.from_images("one", [PHOTOS["coffee"]], scorer)
    with pytest.raises(ValueError, match=r"'imagefab-tiny-clip/random-0'.*'imagefab-tiny-clip/random-7'"):
        reference.distances(np.ones((1, 32), np.float32), "imagefab-tiny-clip/random-7")


def test_bad_folders_name_the_key_and_path(scorer: ClipScorer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'acme'.*missing"):
        StyleReference.from_folder("acme", tmp_path / "missing", scorer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'acme'.*no \.png"):
        StyleReference.from_folder("acme", tmp_path / "empty", scorer)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"'acme'.*a\.png"):
        StyleReference.from_folder("acme", broken, scorer)
    with pytest.raises(ValueError, match="no images"):
        StyleReference.from_images("acme", [], scorer)


def test_which_reference_applies() -> None:
    references = {"sdxl-base|brand-lora@0.8": "a", "brand=acme": "b", "campaign=spring": "c"}
    assert style_key_for(references, "sdxl-base|brand-lora@0.8", {"brand": "acme"}) == "sdxl-base|brand-lora@0.8"
    assert style_key_for(references, "sdxl-base|", {"brand": "acme", "campaign": "spring"}) == "brand=acme"
    assert style_key_for(references, "sdxl-base|", {"campaign": "spring"}) == "campaign=spring"
    assert style_key_for(references, "sdxl-base|", {"brand": "other"}) is None
    assert style_key_for(references, None, None) is None


@pytest.mark.parametrize(("cos", "reasons"), [(0.95, ()), (0.75, ("borderline_off_style",)), (0.5, ("off_style",))])
def test_style_thresholds(cos: float, reasons: tuple[str, ...]) -> None:
    reference = StyleReference(
        key="brand=acme",
        model_id=f"{TINY_MODEL}/random-0",
        centroid=np.array([1.0, 0.0, 0.0], np.float32),
        reference_distances=np.zeros(1, np.float32),
        phashes=("0" * 16,),
        sources=("#0",),
        digest="",
    )
    settings = QcSettings(clip_model=TINY_MODEL, max_style_distance=0.4, review_style_distance=0.2)
    # The image's embedding, chosen at cosine `cos` to the reference's centroid
    measure = ClipMeasure(settings.clip_model_id, np.array([cos, math.sqrt(1 - cos**2), 0.0], np.float32), math.nan, {})
    verdict = evaluate(PHOTOS["astronaut"], None, settings, clip_measure=measure, style=reference)
    assert verdict.reasons == reasons
    assert verdict.scores["style_distance"] == pytest.approx(1 - cos, abs=1e-6)
    assert verdict.scores["style_phash_distance"] == hamming(verdict.phash, "0" * 16)


def test_style_without_clip_is_refused(scorer: ClipScorer) -> None:
    reference = StyleReference.from_images("one", [PHOTOS["coffee"]], scorer)
    with pytest.raises(ValueError, match="CLIP"):
        evaluate_batch([PHOTOS["coffee"]], [None], QcSettings(), styles=[reference])


def test_qc_models_loads_references_and_picks_them_per_image(reference_folder: Path) -> None:
    settings = QcSettings(
        clip_model=TINY_MODEL,
        style_references={"brand=acme": str(reference_folder)},
        max_style_distance=2.0,
        review_style_distance=2.0,
    )
    models = QcModels.load(settings)
    assert set(models.styles) == {"brand=acme"}
    with_style, without = models.evaluate_batch(
        [PHOTOS["coffee"], PHOTOS["coffee"]],
        ["coffee", "coffee"],
        combinations=["x|", "x|"],
        tags=[{"brand": "acme"}, {"brand": "other"}],
    )
    assert 0.0 <= with_style.scores["style_distance"] <= 2.0
    assert math.isnan(without.scores["style_distance"])


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"style_references": {"brand=acme": "refs/acme"}}, ["style_references", "clip_model"]),
        ({"clip_model": TINY_MODEL, "style_references": {"brand=": "refs"}}, ["brand="]),
        ({"clip_model": TINY_MODEL, "style_references": {"acme": ""}}, ["acme"]),
        (
            {"clip_model": TINY_MODEL, "max_style_distance": 0.2, "review_style_distance": 0.3},
            ["review_style_distance", "max_style_distance", "0.3", "0.2"],
        ),
    ],
)
def test_style_settings_name_fields_and_values(fields: dict, names: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        QcSettings(**fields)
    for name in names:
        assert name in str(error.value)
