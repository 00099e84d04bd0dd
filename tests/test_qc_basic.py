"""QC on real photographs: scikit-image's sample photos, sharp, blurred and flattened.

The same default thresholds must hold at 512 px and at 1024 px (originals upscaled with
LANCZOS), which is what measuring sharpness on a fixed working size is for.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from photos import photo
from PIL import Image
from pydantic import ValidationError
from skimage import data as skdata

from app.qc import QcSettings, QcVerdict, check_image, check_image_bytes, luminance, sharpness
from benchmarks.qc_eval import gaussian_blur, squeeze_contrast  # the variants the precision/recall table uses

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field")
SIZES = (512, 1024)
SETTINGS = QcSettings()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --- real photographs ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", PHOTOS)
def test_sharp_photos_are_accepted(name: str, size: int) -> None:
    verdict = check_image(photo(name, size), SETTINGS)
    assert verdict.status == "accepted", verdict
    assert verdict.reasons == ()
    assert verdict.scores["sharpness"] > SETTINGS.review_sharpness


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", PHOTOS)
def test_blurred_photos_are_rejected_for_blur(name: str, size: int) -> None:
    verdict = check_image(gaussian_blur(photo(name, size), sigma=3.0), SETTINGS)
    assert verdict.status == "rejected", verdict
    assert "blur" in verdict.reasons
    assert verdict.scores["sharpness"] < SETTINGS.min_sharpness


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", PHOTOS)
def test_low_contrast_photos_are_rejected_for_low_contrast(name: str, size: int) -> None:
    verdict = check_image(squeeze_contrast(photo(name, size)), SETTINGS)
    assert verdict.status == "rejected", verdict
    assert "low_contrast" in verdict.reasons
    assert "blank" not in verdict.reasons
    assert verdict.scores["contrast"] < SETTINGS.min_contrast


@pytest.mark.parametrize("name", PHOTOS)
def test_sharpness_means_the_same_at_512_and_1024(name: str) -> None:
    # Without the fixed working size the 1024 px copy would score 4-16x lower.
    at_512 = sharpness(luminance(photo(name, 512)))
    at_1024 = sharpness(luminance(photo(name, 1024)))
    assert 0.5 < at_1024 / at_512 < 1.5, (at_512, at_1024)


def test_scores_are_reported() -> None:
    verdict = check_image(photo("astronaut", 512), SETTINGS)
    assert set(verdict.scores) == {"sharpness", "contrast", "exposure", "mean_luma"}
    assert 0.25 < verdict.scores["contrast"] < 0.35
    assert 0.0 < verdict.scores["exposure"] < SETTINGS.review_clipped  # the black suit clips a little
    assert 0.0 < verdict.scores["mean_luma"] < 1.0


# --- input kinds ----------------------------------------------------------------------------------


def test_grayscale_array_and_pil_image_are_handled() -> None:
    gray = skdata.camera()  # [512, 512] uint8
    from_array = check_image(gray, SETTINGS)
    from_pil = check_image(Image.fromarray(gray), SETTINGS)
    assert from_array.status == from_pil.status == "accepted"
    assert from_array.scores == pytest.approx(from_pil.scores)
    assert check_image(gray[:, :, None], SETTINGS).scores == pytest.approx(from_array.scores)


@pytest.mark.parametrize("as_pil", [False, True])
def test_rgba_is_composited_over_white(as_pil: bool) -> None:
    rgb = photo("coffee", 512)
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    transparent = opaque.copy()
    transparent[:, :, 3] = 0
    to_input = Image.fromarray if as_pil else (lambda pixels: pixels)

    opaque_verdict = check_image(to_input(opaque), SETTINGS)
    assert opaque_verdict.status == "accepted"
    assert opaque_verdict.scores == pytest.approx(check_image(rgb, SETTINGS).scores)
    # Fully transparent = a white page: blank and overexposed, not the hidden photo.
    assert check_image(to_input(transparent), SETTINGS).reasons == ("blank", "overexposed")


def test_wrong_dtype_and_shape_name_the_value() -> None:
    with pytest.raises(TypeError, match="float64"):
        check_image(np.zeros((64, 64, 3)), SETTINGS)
    with pytest.raises(ValueError, match=r"\(64, 64, 2\)"):
        check_image(np.zeros((64, 64, 2), np.uint8), SETTINGS)


# --- degenerate images ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reasons"),
    [(128, ("blank",)), (0, ("blank", "underexposed")), (255, ("blank", "overexposed"))],
)
def test_uniform_images_are_blank(value: int, reasons: tuple[str, ...]) -> None:
    verdict = check_image(np.full((512, 512, 3), value, np.uint8), SETTINGS)
    assert verdict.status == "rejected"
    assert verdict.reasons == reasons


def test_faint_noise_on_grey_is_still_blank() -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 1.0, (512, 512, 3)), 0, 255).astype(np.uint8)
    assert check_image(noisy, SETTINGS).reasons == ("blank",)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (7, 512, 3), (512, 7), (0, 0, 3)])
def test_tiny_images_are_too_small(shape: tuple[int, ...]) -> None:
    verdict = check_image(np.zeros(shape, np.uint8), SETTINGS)
    assert verdict.status == "rejected"
    assert verdict.reasons == ("too_small",)
    assert all(math.isnan(score) for score in verdict.scores.values())


def test_one_pixel_pil_image_is_too_small() -> None:
    assert check_image(Image.new("RGB", (1, 1)), SETTINGS).reasons == ("too_small",)


def test_8x8_is_measured() -> None:
    checker = np.indices((8, 8)).sum(axis=0) % 2 * 255
    verdict = check_image(checker.astype(np.uint8), SETTINGS)
    assert verdict.reasons != ("too_small",)
    assert not math.isnan(verdict.scores["sharpness"])


@pytest.mark.parametrize(("dark", "reason"), [(True, "underexposed"), (False, "overexposed")])
def test_clipped_photos_are_rejected(dark: bool, reason: str) -> None:
    pixels = np.array(photo("astronaut", 512))
    pixels[: int(0.7 * pixels.shape[0])] = 0 if dark else 255  # 70% of rows crushed
    verdict = check_image(pixels, SETTINGS)
    assert verdict.status == "rejected"
    assert reason in verdict.reasons
    assert verdict.scores["exposure"] >= 0.7


# --- nonfinite output ---------------------------------------------------------------------------------


def test_nonfinite_output_is_rejected() -> None:
    verdict = check_image(photo("rocket", 512), SETTINGS, nonfinite_fraction=0.001)
    assert verdict.status == "rejected"
    assert verdict.reasons == ("nonfinite_output",)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_invalid_nonfinite_fraction_names_the_value(fraction: float) -> None:
    with pytest.raises(ValueError, match="nonfinite_fraction"):
        check_image(photo("rocket", 512), SETTINGS, nonfinite_fraction=fraction)


# --- encoded bytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_encoded_photos_are_checked(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo("chelsea", 512)).save(buffer, format=fmt, quality=90)
    assert check_image_bytes(buffer.getvalue(), SETTINGS).status == "accepted"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(png_bytes(photo("astronaut", 512))[:5000], id="truncated-png"),
        pytest.param(png_bytes(photo("astronaut", 512))[:40], id="header-only-png"),
        pytest.param(b"not an image at all" * 10, id="garbage"),
        pytest.param(b"", id="empty"),
    ],
)
def test_unreadable_bytes_are_rejected(data: bytes) -> None:
    verdict = check_image_bytes(data, SETTINGS)
    assert verdict == QcVerdict("rejected", ("unreadable_image",), verdict.scores)
    assert all(math.isnan(score) for score in verdict.scores.values())


def test_other_formats_are_unreadable() -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo("astronaut", 512)).save(buffer, format="BMP")
    assert check_image_bytes(buffer.getvalue(), SETTINGS).reasons == ("unreadable_image",)


# --- settings ------------------------------------------------------------------------------------------


def test_review_band() -> None:
    settings = QcSettings(review_sharpness=1e9)  # every real image is "borderline" now
    verdict = check_image(photo("coffee", 512), settings)
    assert verdict.status == "review"
    assert verdict.reasons == ("borderline_blur",)


def test_rejected_verdict_keeps_review_reasons() -> None:
    settings = QcSettings(review_contrast=0.5)
    verdict = check_image(gaussian_blur(photo("coffee", 512), 3.0), settings)
    assert verdict.status == "rejected"
    assert verdict.reasons == ("blur", "borderline_low_contrast")


def test_disabled_checks_do_not_reject() -> None:
    settings = QcSettings(enabled=("exposure", "blank"))
    blurred = gaussian_blur(photo("coffee", 512), 3.0)
    assert check_image(blurred, settings).status == "accepted"
    assert check_image(photo("coffee", 512), settings, nonfinite_fraction=0.5).status == "accepted"


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"min_sharpness": 50.0, "review_sharpness": 20.0}, ["review_sharpness", "min_sharpness", "20.0", "50.0"]),
        ({"min_contrast": 0.1, "review_contrast": 0.05}, ["review_contrast", "min_contrast", "0.05", "0.1"]),
        ({"max_clipped": 0.2, "review_clipped": 0.4}, ["review_clipped", "max_clipped", "0.4", "0.2"]),
        ({"min_std_blank": 0.2, "min_contrast": 0.1, "review_contrast": 0.2}, ["min_std_blank", "0.2", "0.1"]),
        ({"enabled": ("sharpness", "colourfulness")}, ["colourfulness", "nonfinite"]),
        ({"enabled": ("blank", "blank")}, ["blank"]),
        ({"min_contrast": -0.1}, ["min_contrast", "-0.1"]),
        ({"min_sharpnes": 10.0}, ["min_sharpnes"]),
    ],
)
def test_inconsistent_settings_name_fields_and_values(fields: dict, names: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        QcSettings(**fields)
    for name in names:
        assert name in str(error.value)


def test_qc_version_is_a_stable_hash_of_the_thresholds() -> None:
    version = QcSettings().qc_version
    assert version.startswith("qc2-") and len(version) == len("qc2-") + 12
    int(version[4:], 16)
    assert QcSettings().qc_version == version
    assert QcSettings(min_sharpness=31.0).qc_version != version
    assert QcSettings(enabled=("blank",)).qc_version != version


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        SETTINGS.min_sharpness = 1.0  # type: ignore[misc]


# --- cost and imports -----------------------------------------------------------------------------------


def test_check_image_is_fast() -> None:
    pixels = photo("astronaut", 1024)  # 1024 x 1024
    check_image(pixels, SETTINGS)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        check_image(pixels, SETTINGS)
        timings.append(time.perf_counter() - start)
    # About 6-10 ms on one core; the bound leaves room for a loaded CI machine.
    assert sorted(timings)[2] < 0.05, timings


def test_importing_qc_pulls_in_no_heavy_dependencies() -> None:
    code = "import sys, app.qc; print(sorted({'ray', 'torch', 'mlflow', 'duckdb'} & set(sys.modules)))"
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"
