"""Provenance metadata: A1111 infotext written and parsed, the JSON record, XMP and EXIF, read back
from PNG, JPEG and WebP files as the encoder writes them."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
from metadata_samples import LORA_SHA, MODEL_SHA, NASTY_PROMPT, decode, make_metadata
from PIL import Image
from skimage import data as skdata

from app.metadata import DIGITAL_SOURCE_TYPE, ImageMetadata, format_infotext, parse_infotext, read_metadata
from app.postprocess import ImageFormat, encode_image

FORMATS = ("png", "jpeg", "webp")


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())  # 512 x 512


def test_infotext_is_automatic1111_parameters() -> None:
    meta = make_metadata(prompt="a cat, best quality")
    assert format_infotext(meta) == (
        "a cat, best quality <lora:watercolor:0.8>\n"
        "Negative prompt: blurry, lowres\nextra fingers\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 5.0, Seed: 123, Size: 1024x1024, "
        f"Model hash: {MODEL_SHA[:10]}, Model: sd_xl_base_1.0, "
        f'Lora hashes: "watercolor: {LORA_SHA[:10]}", imagefab image_id: img-0001'
    )


def test_infotext_without_negative_prompt_or_loras() -> None:
    meta = make_metadata(prompt="a cat", negative_prompt="", loras=(), cfg_scale=7)
    assert format_infotext(meta) == (
        "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7.0, Seed: 123, Size: 1024x1024, "
        f"Model hash: {MODEL_SHA[:10]}, Model: sd_xl_base_1.0, imagefab image_id: img-0001"
    )


def test_lora_tag_already_in_the_prompt_is_not_repeated() -> None:
    meta = make_metadata(prompt="<lora:watercolor:0.5> a cat")
    assert format_infotext(meta).split("\n")[0] == "<lora:watercolor:0.5> a cat"


def test_infotext_parses_back() -> None:
    meta = make_metadata()
    parsed = parse_infotext(format_infotext(meta))
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
def test_metadata_round_trips_through_every_format(astronaut: Image.Image, fmt: ImageFormat) -> None:
    meta = make_metadata()
    data = encode_image(astronaut, fmt, meta, quality=90)
    assert decode(data).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]

    found = read_metadata(data)
    assert found["parameters"] == format_infotext(meta)
    assert ImageMetadata.from_dict(found["imagefab"]) == meta
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE


@pytest.mark.parametrize("fmt", FORMATS)
def test_digital_source_type_is_declared_even_without_metadata(astronaut: Image.Image, fmt: ImageFormat) -> None:
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
    identifier = root.find(".//dc:identifier", ns)
    assert identifier is not None and identifier.text == "img-0001"


def test_png_keeps_parameters_and_imagefab_chunks(astronaut: Image.Image) -> None:
    meta = make_metadata(prompt="plain ascii prompt")
    image = decode(encode_image(astronaut, "png", meta))
    assert image.info["parameters"] == format_infotext(meta)
    assert ImageMetadata.from_dict(json.loads(image.info["imagefab"])) == meta


def test_exif_user_comment_is_a1111_unicode(astronaut: Image.Image) -> None:
    meta = make_metadata()
    exif = decode(encode_image(astronaut, "jpeg", meta)).getexif()
    comment = exif.get_ifd(0x8769)[0x9286]
    # piexif.helper.UserComment.dump(text, encoding="unicode"), as A1111 writes it.
    assert comment == b"UNICODE\x00" + format_infotext(meta).encode("utf-16-be")


def test_jpeg_drops_the_xmp_json_copy_when_it_does_not_fit(astronaut: Image.Image) -> None:
    meta = make_metadata(prompt="猫" * 12000)  # 72 kB of UTF-8 in XMP, 24 kB of UTF-16 in EXIF
    found = read_metadata(encode_image(astronaut, "jpeg", meta))
    assert found["parameters"] == format_infotext(meta)
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert "imagefab" not in found


def test_jpeg_refuses_an_infotext_longer_than_exif_holds(astronaut: Image.Image) -> None:
    with pytest.raises(ValueError, match="'img-0001'.*png.*webp"):
        encode_image(astronaut, "jpeg", make_metadata(prompt="x" * 40000))
    assert read_metadata(encode_image(astronaut, "webp", make_metadata(prompt="x" * 40000)))["parameters"]


def test_unreadable_bytes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="cannot read metadata"):
        read_metadata(b"garbage")


# --- image-conditioned images -----------------------------------------------------------------------
CUP_SHA, MASK_SHA = "c" * 64, "d" * 64
INPAINT = {
    "mode": "inpaint",
    "image_uri": "s3://shop/packshots/cup.png",
    "image_sha256": CUP_SHA,
    "mask_uri": "/data/cup_mask.png",
    "mask_sha256": MASK_SHA,
    "mask_source": "mask",
    "strength": 0.75,
    "mask_blur": 4,
    "blend_px": 4,
}
# AUTOMATIC1111's own reading of the parameter line (modules/infotext_utils.py: parse_generation_parameters).
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parameters(text: str) -> dict[str, str]:
    *_, lastline = text.strip().split("\n")
    found = A1111_PARAM.findall(lastline)
    assert len(found) >= 3, "A1111 would read this parameter line as prompt"
    return {k: json.loads(v) if v[:1] == '"' == v[-1:] else v for k, v in found}


def test_an_inpainted_image_says_its_denoising_strength_and_mask_blur_as_a1111_does() -> None:
    meta = make_metadata(prompt="a cup on marble", loras=(), conditioning=INPAINT)
    text = format_infotext(meta)
    assert text.endswith("Model: sd_xl_base_1.0, Denoising strength: 0.75, Mask blur: 4, imagefab image_id: img-0001")
    parsed = parse_infotext(text)
    assert parsed["denoising_strength"] == 0.75 and parsed["mask_blur"] == 4
    a1111 = a1111_parameters(text)
    assert a1111["Denoising strength"] == "0.75" and a1111["Mask blur"] == "4" and a1111["Steps"] == "30"
    assert a1111["imagefab image_id"] == "img-0001"


def test_img2img_and_upscale_infotext() -> None:
    img2img = make_metadata(loras=(), conditioning={"mode": "img2img", "image_uri": "/a.png", "strength": 0.6})
    assert "Denoising strength: 0.6, imagefab" in format_infotext(img2img)
    assert "Mask blur" not in format_infotext(img2img)
    up = make_metadata(loras=(), conditioning={"mode": "upscale", "strength": 0.3, "tile_overlap": 64})
    params = a1111_parameters(format_infotext(up))
    assert params["Denoising strength"] == "0.3" and params["SD upscale overlap"] == "64"
    assert params["SD upscale upscaler"] == "Lanczos"
    txt2img = make_metadata()
    assert "Denoising" not in format_infotext(txt2img) and "conditioning" not in txt2img.to_dict()


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_inputs_uri_and_sha256_are_read_back_from_every_format(astronaut: Image.Image, fmt: ImageFormat) -> None:
    meta = make_metadata(conditioning=INPAINT)
    found = read_metadata(encode_image(astronaut, fmt, meta, quality=90))
    record = found["imagefab"]["conditioning"]
    assert (record["image_uri"], record["image_sha256"]) == ("s3://shop/packshots/cup.png", CUP_SHA)
    assert (record["mask_uri"], record["mask_sha256"]) == ("/data/cup_mask.png", MASK_SHA)
    assert ImageMetadata.from_dict(found["imagefab"]) == meta
    assert parse_infotext(found["parameters"])["denoising_strength"] == 0.75


def test_conditioning_values_must_be_text_or_numbers() -> None:
    with pytest.raises(ValueError, match="conditioning.mask"):
        make_metadata(conditioning={"mode": "inpaint", "mask": [1, 2]})
