"""Post-processing on real photos: preset geometry, watermark, metadata in PNG/JPEG/WebP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from skimage import data as skdata

from app.postprocess import (
    DIGITAL_SOURCE_TYPE,
    PRESETS,
    ImageMetadata,
    PostprocessSettings,
    WatermarkSettings,
    apply_watermark,
    encode_image,
    encode_master,
    fit_to_preset,
    parse_infotext,
    read_metadata,
    render_variants,
)

FORMATS = ("png", "jpeg", "webp")
# Everything that breaks naive XML, A1111 quoting or Latin-1 text chunks.
NASTY_PROMPT = 'a "cat" <b>&amp; & dog, watercolor: soft\nsecond line\twith tab, 猫と犬 🐱 naïve'
MODEL_SHA = hashlib.sha256(b"sd_xl_base_1.0.safetensors").hexdigest()
LORA_SHA = hashlib.sha256(b"watercolor.safetensors").hexdigest()


def make_metadata(**overrides) -> ImageMetadata:
    fields = dict(
        image_id="img-0001",
        prompt=NASTY_PROMPT,
        negative_prompt="blurry, lowres\nextra fingers",
        steps=30,
        sampler="Euler a",
        cfg_scale=5.0,
        seed=123,
        width=1024,
        height=1024,
        model_name="sd_xl_base_1.0",
        model_hash=MODEL_SHA,
        loras=(("watercolor", 0.8, LORA_SHA),),
        run_id="run-42",
        extra={"campaign": "spring"},
    )
    fields.update(overrides)
    return ImageMetadata(**fields)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())  # 512 x 512


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600 x 400, landscape


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


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


# --- metadata -----------------------------------------------------------------------------------------------


def test_infotext_is_automatic1111_parameters() -> None:
    meta = make_metadata(prompt="a cat, best quality")
    assert meta.infotext() == (
        "a cat, best quality <lora:watercolor:0.8>\n"
        "Negative prompt: blurry, lowres\nextra fingers\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 5.0, Seed: 123, Size: 1024x1024, "
        f"Model hash: {MODEL_SHA[:10]}, Model: sd_xl_base_1.0, "
        f'Lora hashes: "watercolor: {LORA_SHA[:10]}", imagefab image_id: img-0001'
    )


def test_infotext_without_negative_prompt_or_loras() -> None:
    meta = make_metadata(prompt="a cat", negative_prompt="", loras=(), cfg_scale=7)
    assert meta.infotext() == (
        "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 1024x1024, "
        f"Model hash: {MODEL_SHA[:10]}, Model: sd_xl_base_1.0, imagefab image_id: img-0001"
    )


def test_lora_tag_already_in_the_prompt_is_not_repeated() -> None:
    meta = make_metadata(prompt="<lora:watercolor:0.5> a cat")
    assert meta.infotext().split("\n")[0] == "<lora:watercolor:0.5> a cat"


def test_infotext_parses_back() -> None:
    meta = make_metadata()
    parsed = parse_infotext(meta.infotext())
    assert parsed["prompt"] == f"{NASTY_PROMPT} <lora:watercolor:0.8>"
    assert parsed["negative_prompt"] == meta.negative_prompt
    assert parsed["loras"] == [("watercolor", 0.8)]
    assert parsed["steps"] == 30 and parsed["seed"] == 123
    assert parsed["sampler"] == "Euler a"
    assert parsed["cfg_scale"] == 5.0
    assert (parsed["size"], parsed["width"], parsed["height"]) == ("1024x1024", 1024, 1024)
    assert parsed["model_hash"] == MODEL_SHA[:10]
    assert parsed["model"] == "sd_xl_base_1.0"
    assert parsed["lora_hashes"] == {"watercolor": LORA_SHA[:10]}
    assert parsed["image_id"] == "img-0001"


def test_parse_foreign_infotext_with_quoted_commas() -> None:
    text = (
        "masterpiece, 1girl, <lora:detail:1.2>\n"
        "Negative prompt: worst quality\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 832x1216, "
        'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "detail: 9f1b, style: 0ab2", '
        'TI hashes: "neg: 1234", Hires upscaler: "4x-Ultra, sharp", Version: v1.9.4'
    )
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "masterpiece, 1girl, <lora:detail:1.2>"
    assert parsed["negative_prompt"] == "worst quality"
    assert parsed["loras"] == [("detail", 1.2)]
    assert parsed["sampler"] == "DPM++ 2M Karras"
    assert parsed["cfg_scale"] == 7.0
    assert (parsed["width"], parsed["height"]) == (832, 1216)
    assert parsed["lora_hashes"] == {"detail": "9f1b", "style": "0ab2"}
    assert parsed["TI hashes"] == "neg: 1234"
    assert parsed["Hires upscaler"] == "4x-Ultra, sharp"
    assert parsed["Version"] == "v1.9.4"


def test_prompt_only_infotext_has_no_parameters() -> None:
    parsed = parse_infotext("a cat, sitting\non a mat")
    assert parsed["prompt"] == "a cat, sitting\non a mat"
    assert "steps" not in parsed


def test_metadata_json_round_trips() -> None:
    meta = make_metadata()
    assert ImageMetadata.from_dict(json.loads(meta.to_json())) == meta


def test_bad_model_hash_names_the_value() -> None:
    with pytest.raises(ValueError, match="model_hash.*'abc'"):
        make_metadata(model_hash="abc")


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trips_through_every_format(astronaut: Image.Image, fmt: str) -> None:
    meta = make_metadata()
    data = encode_image(astronaut, fmt, meta, quality=90)
    assert decode(data).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]

    found = read_metadata(data)
    assert found["parameters"] == meta.infotext()
    assert ImageMetadata.from_dict(found["imagefab"]) == meta
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE


@pytest.mark.parametrize("fmt", FORMATS)
def test_digital_source_type_is_declared_even_without_metadata(astronaut: Image.Image, fmt: str) -> None:
    found = read_metadata(encode_image(astronaut, fmt, None))
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert "parameters" not in found and "imagefab" not in found


def test_xmp_is_well_formed_and_escaped(astronaut: Image.Image) -> None:
    meta = make_metadata(prompt=NASTY_PROMPT + "\x01 control\r\n")
    image = decode(encode_image(astronaut, "png", meta))
    xmp = image.info["xmp"]
    xmp = xmp.decode("utf-8") if isinstance(xmp, bytes) else xmp
    assert 'xmp:CreatorTool="imagefab"' in xmp
    root = ET.fromstring(xmp)
    ns = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
    description = root.find(".//dc:description/rdf:Alt/rdf:li", ns)
    assert description is not None
    assert description.text == NASTY_PROMPT + "\ufffd control\r\n"  # XML 1.0 cannot carry \x01
    assert root.find(".//dc:identifier", ns).text == "img-0001"


def test_png_keeps_parameters_and_imagefab_chunks(astronaut: Image.Image) -> None:
    meta = make_metadata(prompt="plain ascii prompt")
    image = decode(encode_image(astronaut, "png", meta))
    assert image.info["parameters"] == meta.infotext()
    assert ImageMetadata.from_dict(json.loads(image.info["imagefab"])) == meta


def test_exif_user_comment_is_a1111_unicode(astronaut: Image.Image) -> None:
    meta = make_metadata()
    exif = decode(encode_image(astronaut, "jpeg", meta)).getexif()
    comment = exif.get_ifd(0x8769)[0x9286]
    # piexif.helper.UserComment.dump(text, encoding="unicode"), as A1111 writes it.
    assert comment == b"UNICODE\x00" + meta.infotext().encode("utf-16-be")


def test_jpeg_drops_the_xmp_json_copy_when_it_does_not_fit(astronaut: Image.Image) -> None:
    meta = make_metadata(prompt="猫" * 12000)  # 72 kB of UTF-8 in XMP, 24 kB of UTF-16 in EXIF
    found = read_metadata(encode_image(astronaut, "jpeg", meta))
    assert found["parameters"] == meta.infotext()
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert "imagefab" not in found


def test_jpeg_refuses_an_infotext_longer_than_exif_holds(astronaut: Image.Image) -> None:
    with pytest.raises(ValueError, match="'img-0001'.*png.*webp"):
        encode_image(astronaut, "jpeg", make_metadata(prompt="x" * 40000))
    assert read_metadata(encode_image(astronaut, "webp", make_metadata(prompt="x" * 40000)))["parameters"]


def test_unreadable_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="cannot read metadata"):
        read_metadata(b"garbage")


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
        assert found["parameters"] == meta.infotext()
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
    assert read_metadata(data)["parameters"] == meta.infotext()


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


def test_importing_postprocess_pulls_in_no_heavy_dependencies() -> None:
    code = "import sys, app.postprocess; print(sorted({'ray', 'torch', 'mlflow', 'duckdb'} & set(sys.modules)))"
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"
