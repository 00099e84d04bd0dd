"""Post-processing on real photos: preset geometry, watermark, variants and the master with their metadata."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from metadata_samples import decode, make_metadata
from PIL import Image
from pydantic import ValidationError
from skimage import data as skdata

from app.metadata import DIGITAL_SOURCE_TYPE, format_infotext, read_metadata
from app.postprocess import (
    PRESETS,
    PostprocessSettings,
    WatermarkSettings,
    apply_watermark,
    encode_image,
    encode_master,
    fit_to_preset,
    render_variants,
)

FORMATS = ("png", "jpeg", "webp")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())  # 512 x 512


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600 x 400, landscape


# --- geometry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fit", ["cover", "contain"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_its_exact_size(coffee: Image.Image, name: str, fit: str) -> None:
    preset = PRESETS[name]
    result = fit_to_preset(coffee, preset, fit)
    assert result.size == (preset.width, preset.height)
    assert result.mode == "RGB"


def test_presets_include_the_platform_sizes() -> None:
    expected = {
        "instagram_square": (1080, 1080),
        "instagram_portrait": (1080, 1350),
        "instagram_story": (1080, 1920),
        "tiktok": (1080, 1920),
        "linkedin": (1200, 627),
        "facebook_feed": (1200, 630),
        "x_post": (1600, 900),
        "pinterest": (1000, 1500),
        "ecommerce_square": (2000, 2000),
        "thumbnail": (256, 256),
        "web_hero": (1920, 1080),
    }
    assert {name: (PRESETS[name].width, PRESETS[name].height) for name in expected} == expected


def three_stripes(across: bool) -> Image.Image:
    """Red | green | blue thirds, 900 x 300 (across) or 300 x 900 (stacked)."""
    stripes = np.zeros((300, 900, 3), np.uint8)
    for i in range(3):
        stripes[:, i * 300 : (i + 1) * 300, i] = 255
    return Image.fromarray(stripes if across else stripes.transpose(1, 0, 2).copy())


@pytest.mark.parametrize("across", [True, False])
def test_cover_keeps_the_centre(across: bool) -> None:
    result = np.asarray(fit_to_preset(three_stripes(across), PRESETS["thumbnail"], "cover")).astype(int)
    inner = result[8:-8, 8:-8]  # away from the resampling filter's reach into the cut-off parts
    assert (inner[:, :, 1] > 240).all(), "the centre (green) third fills the frame"
    assert (inner[:, :, 0] < 15).all() and (inner[:, :, 2] < 15).all()


def test_contain_pads_with_white() -> None:
    green = Image.new("RGB", (300, 100), (0, 200, 0))
    result = np.asarray(fit_to_preset(green, PRESETS["thumbnail"], "contain"))
    # 300x100 -> 256x85, centred: white bands of 85 and 86 rows.
    assert (result[:84] == 255).all()
    assert (result[172:] == 255).all()
    assert (result[90:165, :, 1] == 200).all() and (result[90:165, :, 0] == 0).all()


def test_rgba_input_is_flattened_onto_white() -> None:
    transparent = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    result = fit_to_preset(transparent, PRESETS["thumbnail"], "cover")
    assert result.mode == "RGB"
    assert (np.asarray(result) == 255).all()


def test_unknown_fit_names_the_value(coffee: Image.Image) -> None:
    with pytest.raises(ValueError, match="'stretch'"):
        fit_to_preset(coffee, PRESETS["thumbnail"], "stretch")  # type: ignore[arg-type]


# --- watermark -------------------------------------------------------------------------------------------


REGIONS = {  # (x0, y0, x1, y1) as shares of width and height
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "center": (0.25, 0.25, 0.75, 0.75),
}


@pytest.mark.parametrize("position", sorted(REGIONS))
def test_watermark_marks_only_the_chosen_corner(astronaut: Image.Image, position: str) -> None:
    before = np.asarray(astronaut).copy()
    result = apply_watermark(astronaut, WatermarkSettings(text="imagefab", position=position))

    assert np.array_equal(np.asarray(astronaut), before), "the input must not change"
    changed = (np.asarray(result).astype(int) - before).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 200, "the watermark must be visible"
    x0, y0, x1, y1 = REGIONS[position]
    height, width = changed.shape
    assert xs.min() >= x0 * width and xs.max() < x1 * width
    assert ys.min() >= y0 * height and ys.max() < y1 * height


@pytest.mark.parametrize("value", [0, 255])
def test_watermark_shows_on_black_and_white(value: int) -> None:
    plain = Image.new("RGB", (640, 480), (value, value, value))
    result = np.asarray(apply_watermark(plain, WatermarkSettings(text="imagefab")))
    assert np.abs(result.astype(int) - value).max() > 40


def test_watermark_scales_with_image_height(astronaut: Image.Image) -> None:
    def marked_rows(image: Image.Image, scale: float) -> int:
        result = apply_watermark(image, WatermarkSettings(text="imagefab", scale=scale))
        return int((np.asarray(result).astype(int) != np.asarray(image)).any(axis=(1, 2)).sum())

    small, large = marked_rows(astronaut, 0.04), marked_rows(astronaut, 0.08)
    assert 1.6 < large / small < 2.4
    assert marked_rows(astronaut.resize((1024, 1024)), 0.04) > 1.6 * small


def test_long_watermark_text_fits_the_width() -> None:
    plain = Image.new("RGB", (200, 400), (128, 128, 128))
    text = "(c) imagefab studio, all rights reserved"
    settings = WatermarkSettings(text=text, scale=0.1, position="bottom-left")
    changed = (np.asarray(apply_watermark(plain, settings)).astype(int) != 128).any(axis=(0, 2))
    assert changed[:2].sum() == 0 and changed[-2:].sum() == 0  # margins on both sides


# --- variants and master ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_variants(astronaut: Image.Image, fmt: str) -> None:
    meta = make_metadata()
    settings = PostprocessSettings(
        presets=("instagram_portrait", "linkedin", "thumbnail"),
        format=fmt,
        watermark=WatermarkSettings(text="imagefab"),
    )
    variants = render_variants(astronaut, settings, meta)

    assert [v.preset for v in variants] == list(settings.presets)
    for variant in variants:
        image = decode(variant.data)
        assert (
            image.size
            == (variant.width, variant.height)
            == (
                PRESETS[variant.preset].width,
                PRESETS[variant.preset].height,
            )
        )
        assert variant.format == fmt
        found = read_metadata(variant.data)
        assert found["parameters"] == format_infotext(meta)
        assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE


def test_variants_are_watermarked_after_resizing(astronaut: Image.Image) -> None:
    plain = PostprocessSettings(presets=("thumbnail",))
    marked = plain.model_copy(update={"watermark": WatermarkSettings(text="imagefab", position="top-left")})
    clean = np.asarray(decode(render_variants(astronaut, plain)[0].data)).astype(int)
    stamped = np.asarray(decode(render_variants(astronaut, marked)[0].data)).astype(int)
    changed = (clean != stamped).any(axis=2)
    assert changed[:128, :128].sum() > 50 and changed[128:, 128:].sum() == 0


def test_master_is_full_size_lossless_and_unmarked(astronaut: Image.Image) -> None:
    meta = make_metadata()
    data = encode_master(astronaut, meta)
    image = decode(data)
    assert image.format == "PNG"
    assert np.array_equal(np.asarray(image), np.asarray(astronaut))
    assert read_metadata(data)["parameters"] == format_infotext(meta)


def test_png_compress_level_trades_size_for_speed(astronaut: Image.Image) -> None:
    fast = encode_image(astronaut, "png", None, png_compress_level=1)
    small = encode_image(astronaut, "png", None, png_compress_level=9)
    assert len(small) < len(fast)
    assert np.array_equal(np.asarray(decode(fast)), np.asarray(decode(small)))


# --- settings validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (lambda: PostprocessSettings(presets=("myspace",)), ["presets", "myspace", "instagram_square"]),
        (lambda: PostprocessSettings(presets=("tiktok", "tiktok")), ["presets", "tiktok"]),
        (lambda: PostprocessSettings(quality=0), ["quality", "input_value=0"]),
        (lambda: PostprocessSettings(png_compress_level=10), ["png_compress_level", "input_value=10"]),
        (lambda: PostprocessSettings(format="gif"), ["format", "gif"]),
        (lambda: PostprocessSettings(fit="stretch"), ["fit", "stretch"]),
        (lambda: PostprocessSettings(sizes=(1, 2)), ["sizes"]),
        (lambda: WatermarkSettings(text="x", opacity=0), ["opacity", "input_value=0"]),
        (lambda: WatermarkSettings(text="x", opacity=1.5), ["opacity", "input_value=1.5"]),
        (lambda: WatermarkSettings(text=""), ["text"]),
        (lambda: WatermarkSettings(text="   "), ["text", "'   '"]),
        (lambda: WatermarkSettings(text="x" * 201), ["text", "200"]),
        (lambda: WatermarkSettings(text="x", position="middle"), ["position", "middle"]),
    ],
)
def test_bad_settings_name_field_and_value(build, names: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        build()
    for name in names:
        assert name in str(error.value)


def test_encode_image_rejects_bad_arguments(astronaut: Image.Image) -> None:
    with pytest.raises(ValueError, match="'gif'"):
        encode_image(astronaut, "gif", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality.*0"):
        encode_image(astronaut, "jpeg", None, quality=0)


def test_importing_postprocess_and_metadata_pulls_in_no_heavy_dependencies() -> None:
    code = "import sys, app.postprocess, app.metadata; print(sorted({'ray', 'torch', 'mlflow', 'duckdb'} & set(sys.modules)))"
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"
