"""`evaluate_batch`: inputs, unmeasurable images, new settings and their validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage
from skimage import data as skdata

from app.qc import EVALUATE_SCORE_KEYS, KNOWN_CHECKS, QcSettings, evaluate, evaluate_batch

SETTINGS = QcSettings()
ASTRONAUT = skdata.astronaut()


def test_batch_keeps_order_and_handles_unmeasurable_images() -> None:
    tiny = np.zeros((4, 4, 3), np.uint8)
    verdicts = evaluate_batch(
        [ASTRONAUT, tiny, skdata.camera()], ["a", None, ""], SETTINGS, nonfinite_fractions=[0.0, 0.0, 0.01]
    )
    assert verdicts[0].status == "accepted"
    assert verdicts[1].reasons == ("too_small",) and verdicts[1].phash is None
    assert tuple(verdicts[1].scores) == EVALUATE_SCORE_KEYS
    assert all(math.isnan(v) for v in verdicts[1].scores.values())
    assert verdicts[2].reasons == ("nonfinite_output",)
    assert evaluate_batch([], [], SETTINGS) == []


def test_evaluate_agrees_with_check_image_on_the_pixel_checks() -> None:
    from app.qc import check_image

    severity = {"accepted": 0, "review": 1, "rejected": 2}
    dark, flat = ASTRONAUT // 6, np.full((64, 64, 3), 120, np.uint8)
    blurred = np.clip(ndimage.uniform_filter(ASTRONAUT, size=(15, 15, 1)), 0, 255).astype(np.uint8)
    seen = set()
    for image in (ASTRONAUT, skdata.camera(), skdata.coffee(), dark, blurred, flat):
        full, pixel_only = evaluate(image, None, SETTINGS), check_image(image, SETTINGS)
        for key in ("sharpness", "contrast", "exposure", "mean_luma"):
            assert full.scores[key] == pytest.approx(pixel_only.scores[key], rel=1e-5, nan_ok=True)
        # evaluate adds checks to the pixel ones: every pixel finding stays, and the verdict is
        # never milder.
        assert set(pixel_only.reasons) <= set(full.reasons)
        assert severity[full.status] >= severity[pixel_only.status]
        seen |= set(pixel_only.reasons)
    assert {"blur", "borderline_low_contrast", "blank"} <= seen  # the pixel checks did find things


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nonfinite_fractions": [0.0, 0.0]}, "1 images but 2 nonfinite_fractions"),
        ({"image_ids": ["a", "b"]}, "1 images but 2 image_ids"),
        ({"styles": []}, "1 images but 0 styles"),
        ({"nonfinite_fractions": [1.5]}, "nonfinite_fraction"),
    ],
)
def test_mismatched_inputs_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_batch([ASTRONAUT], [None], SETTINGS, **kwargs)


def test_known_checks_cover_every_reason_family() -> None:
    assert KNOWN_CHECKS[:5] == ("sharpness", "contrast", "exposure", "blank", "nonfinite")
    for name in (
        "color_cast",
        "black_block",
        "green_block",
        "blockiness",
        "banding",
        "prompt",
        "negative_concepts",
        "duplicates",
        "style",
    ):
        assert name in KNOWN_CHECKS
    assert SETTINGS.enabled == KNOWN_CHECKS


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"max_color_cast": 10.0, "review_color_cast": 12.0}, ["review_color_cast", "max_color_cast", "12.0", "10.0"]),
        ({"max_black_block": 0.1, "review_black_block": 0.2}, ["review_black_block", "max_black_block"]),
        ({"max_green_block": 0.1, "review_green_block": 0.2}, ["review_green_block", "max_green_block"]),
        ({"max_blockiness": 1.5, "review_blockiness": 1.6}, ["review_blockiness", "max_blockiness"]),
        ({"max_banding": 0.5, "review_banding": 0.6}, ["review_banding", "max_banding"]),
        ({"max_blockiness": 0.5}, ["max_blockiness"]),
        (
            {"max_duplicate_distance": 8, "review_duplicate_distance": 4},
            ["review_duplicate_distance", "max_duplicate_distance", "4", "8"],
        ),
        ({"max_duplicate_distance": 65}, ["max_duplicate_distance"]),
        ({"enabled": ("sharpness", "colourfulness")}, ["colourfulness", "color_cast", "style"]),
    ],
)
def test_new_settings_name_fields_and_values(fields: dict, names: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        QcSettings(**fields)
    for name in names:
        assert name in str(error.value)


def test_qc_version_covers_the_new_thresholds() -> None:
    version = SETTINGS.qc_version
    assert version.startswith("qc2-")
    for fields in ({"max_color_cast": 25.0}, {"review_duplicate_distance": 12}, {"enabled": ("blank",)}):
        assert QcSettings(**fields).qc_version != version
    assert QcSettings().qc_version == version


def test_settings_load_from_spec_like_data() -> None:
    settings = QcSettings.model_validate(
        {
            "clip_model": "imagefab-tiny-clip",
            "negative_concepts": ["text", "watermark"],
            "style_references": {"brand=acme": "refs/acme"},
            "min_clip_score": 0.2,
            "review_clip_score": 0.25,
        }
    )
    assert settings.negative_concepts == ("text", "watermark")
    assert settings.style_references == {"brand=acme": "refs/acme"}
