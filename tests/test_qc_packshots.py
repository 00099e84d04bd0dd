"""The normal e-commerce shot passes QC, a photo's own dominant colour is not a cast, and the
real defects are still caught: products cut out of real photographs onto pure white, crops of the
photographs where one natural hue dominates, and those images degraded."""

from __future__ import annotations

import numpy as np
import pytest
from photos import photo

from app.qc import QcSettings, check_image, evaluate
from app.qc.checks import luminance, subject_mask
from benchmarks import packshots, qc_eval

SETTINGS = QcSettings()
SIZE = 512


def flagged_for(reasons: tuple[str, ...], check: str) -> bool:
    return check in reasons or f"borderline_{check}" in reasons


@pytest.fixture(scope="module")
def cutouts() -> dict[str, packshots.Cutout]:
    return {name: make() for name, make in packshots.CUTOUTS.items()}


@pytest.mark.parametrize("fill", [0.45, 0.75])
@pytest.mark.parametrize("name", list(packshots.CUTOUTS))
def test_packshots_on_white_are_accepted(cutouts, name: str, fill: float) -> None:
    shot = qc_eval.packshot_variants(cutouts[name], SIZE, fill)["packshot"]
    verdict = evaluate(shot, None, SETTINGS)
    assert verdict.status == "accepted", verdict
    # the white is clipped by design, and left out of the clipped share
    assert verdict.scores["exposure"] < SETTINGS.review_clipped


@pytest.mark.parametrize("name", list(qc_eval.SCENES))
def test_dominant_colour_scenes_are_not_a_colour_cast(name: str) -> None:
    verdict = evaluate(qc_eval.scene(name, SIZE), None, SETTINGS)
    assert not flagged_for(verdict.reasons, "color_cast"), verdict
    assert verdict.status == "accepted", verdict


@pytest.mark.parametrize("name", ["green_motorcycle", "orange_suit"])
@pytest.mark.parametrize("cast", qc_eval.SCENE_CASTS)
def test_a_tint_over_a_dominant_colour_scene_is_still_a_cast(name: str, cast: str) -> None:
    tinted = qc_eval.color_cast(qc_eval.scene(name, SIZE), *qc_eval.CASTS[cast])
    assert flagged_for(evaluate(tinted, None, SETTINGS).reasons, "color_cast")


@pytest.mark.parametrize("cast", ["cast_red", "cast_yellow", "tint_blue", "tint_green"])
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_real_casts_on_photos_are_rejected(name: str, cast: str) -> None:
    verdict = evaluate(qc_eval.color_cast(photo(name, SIZE), *qc_eval.CASTS[cast]), None, SETTINGS)
    assert "color_cast" in verdict.reasons, verdict


def test_a_tinted_packshot_is_a_cast(cutouts) -> None:
    shot = qc_eval.packshot_variants(cutouts["coffee_cup"], SIZE, 0.75)["packshot_cast"]
    assert "color_cast" in evaluate(shot, None, SETTINGS).reasons


@pytest.mark.parametrize("name", list(packshots.CUTOUTS))
def test_a_blurred_packshot_is_still_blurred(cutouts, name: str) -> None:
    blurred = qc_eval.packshot_variants(cutouts[name], SIZE, 0.75)["packshot_blur"]
    assert flagged_for(check_image(blurred, SETTINGS).reasons, "blur")


@pytest.mark.parametrize("name", ["astronaut", "camera", "immunohistochemistry", "motorcycle"])
def test_overexposed_photos_are_flagged(name: str) -> None:
    source = qc_eval.resized(qc_eval.load_photo(name), SIZE)
    verdict = check_image(qc_eval.overexpose(source), SETTINGS)
    assert flagged_for(verdict.reasons, "overexposed"), verdict


def test_a_blown_sky_is_not_a_backdrop() -> None:
    # white across the top 70% touches three sides of the frame: part of the picture, and clipped
    pixels = np.array(photo("astronaut", SIZE))
    pixels[: int(0.7 * pixels.shape[0])] = 255
    assert subject_mask(luminance(pixels)) is None
    assert "overexposed" in check_image(pixels, SETTINGS).reasons


def test_the_backdrop_is_the_white_around_the_product(cutouts) -> None:
    shot = packshots.packshot(cutouts["helmet"], SIZE, 0.5, shadow=0.0)
    subject = subject_mask(luminance(shot))
    assert subject is not None
    assert 0.15 < subject.mean() < 0.3  # the product's disc: about a fifth of the frame
    assert not subject[0].any() and not subject[:, 0].any()  # the frame's edge is backdrop
    assert subject[SIZE // 2, SIZE // 2]


def test_a_white_page_has_no_subject_and_stays_blank_and_overexposed() -> None:
    page = np.full((SIZE, SIZE, 3), 255, np.uint8)
    assert subject_mask(luminance(page)) is None
    assert check_image(page, SETTINGS).reasons == ("blank", "overexposed")
