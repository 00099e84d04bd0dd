"""Input images sent to the Serve app, without Ray: each upload limit is a 4xx naming itself and
leaves nothing in the output store; accepted uploads are planned like bulk rows and stored under
their content's name, where the generator and `regenerate` read them again."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from photos import photo
from PIL import Image

from app.conditioning.plan import reload_inputs
from app.serve.config import load_serve_config
from app.serve.core import ImageInput, ImageJob, RequestError, ServeCore, fitted_size, mode_settings
from app.serve.uploads import decode_base64, parse_form

REPO = Path(__file__).resolve().parents[1]
PACKSHOTS = REPO / "specs" / "data" / "packshots"
LIMITS = {"max_upload_bytes": 100_000, "max_upload_pixels": 300 * 300, "upload_formats": ["PNG", "JPEG"]}


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb's header without its gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> ServeCore:
    from app.serve.core import resolve_serve_models

    out = tmp_path_factory.mktemp("uploads-out")
    config = load_serve_config(
        None, output_uri=str(out), steps=3, combinations={"plain": {}}, limits={**LIMITS, "max_side": 512}
    )
    return ServeCore(config, resolve_serve_models(config))


def stored(core: ServeCore) -> list[str]:
    """The input files in the server's output store."""
    return sorted(p.name for p in (Path(core.output.uri) / "inputs").glob("*"))


PHOTO = encode(Image.fromarray(photo("astronaut", 128)), "PNG")


@pytest.mark.parametrize(
    "data, status, words",
    [
        (
            encode(Image.fromarray(photo("coffee", 290)), "PNG"),
            413,
            "over max_bytes=100000 (this server's limits.max_upload_bytes)",
        ),
        (encode(Image.new("RGB", (400, 300)), "PNG"), 413, "400x300 = 120000 pixels, over max_pixels=90000"),
        (png_header_only(20_000, 20_000), 413, "limits.max_upload_pixels"),  # a decompression bomb's header
        (encode(Image.new("RGB", (64, 64)), "GIF"), 415, "format GIF is not allowed (allowed: PNG, JPEG)"),
        (encode(Image.new("RGB", (64, 64)), "WEBP"), 415, "limits.upload_formats"),  # allowed by the loader, not here
        (b"not an image at all", 415, "not a recognisable image"),
        (PHOTO[: len(PHOTO) // 2], 422, "cannot decode PNG data"),  # truncated
    ],
)
def test_each_refused_upload_is_a_4xx_naming_the_limit_and_nothing_is_written(core, data, status, words):
    before = stored(core)
    with pytest.raises(RequestError) as err:
        core.uploads.accept(data, "image")
    assert err.value.status == status and err.value.field == "image"
    assert words in err.value.message and "upload 'image'" in err.value.message, err.value.message
    assert stored(core) == before


def test_animated_uploads_are_refused():
    frames = [Image.fromarray(photo(name, 64)) for name in ("chelsea", "coffee")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100)
    config = load_serve_config(None, output_uri="unused")
    from app.serve.uploads import Uploads
    from app.storage import OutputStore

    with pytest.raises(RequestError) as err:
        Uploads(OutputStore.at("unused"), config.limits.input_limits()).accept(buffer.getvalue(), "init_images")
    assert err.value.status == 415 and "animated PNG with 2 frames" in err.value.message
    assert err.value.field == "init_images"


def test_base64_is_bounded_before_decoding_and_data_urls_are_read():
    raw = b"\x89PNG" + bytes(range(256)) * 4
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, "image", 2000) == raw
    assert decode_base64("data:image/png;base64," + text, "image", 2000) == raw
    assert decode_base64(text[:60] + "\n" + text[60:], "image", 2000) == raw  # line-wrapped base64
    with pytest.raises(RequestError) as err:
        decode_base64("A" * 4_000_000, "mask", 2000)  # refused by its length, never decoded
    assert (err.value.status, err.value.field) == (413, "mask") and "limits.max_upload_bytes" in err.value.message
    for bad, words in [
        ("", "is empty"),
        (None, "is empty"),
        ("data:image/png,abc", "must be base64"),
        ("not base64 at all!", "not valid base64"),
    ]:
        with pytest.raises(RequestError, match=words) as err:
            decode_base64(bad, "image", 2000)
        assert err.value.status == 422


def test_cmyk_sixteen_bit_and_palette_uploads_are_normalised(core):
    before = stored(core)
    cmyk = core.uploads.accept(encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"), "image")
    assert cmyk.image.pixels.shape == (48, 64, 3) and cmyk.image.conversions == ("cmyk_to_rgb=plain",)
    wide = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    sixteen = core.uploads.accept(encode(wide, "PNG"), "image")
    assert sixteen.image.conversions == ("16bit_to_8bit",) and int(sixteen.image.pixels.min()) == 255
    palette = Image.new("P", (32, 32), 1)
    palette.info["transparency"] = 0
    assert core.uploads.accept(encode(palette, "PNG", transparency=0), "mask").image.pixels.shape[2] == 4
    assert cmyk.rel == f"inputs/{hashlib.sha256(cmyk.data).hexdigest()}.jpg"
    assert stored(core) == before  # accepting writes nothing


def test_a_planned_inpaint_names_the_stored_upload_and_is_written_only_when_stored(core, tmp_path):
    before = stored(core)
    cup = (PACKSHOTS / "coffee_cup.png").read_bytes()
    cup_mask = (PACKSHOTS / "coffee_cup_mask.png").read_bytes()
    image = core.uploads.accept(cup, "image")
    mask = core.uploads.accept(cup_mask, "mask")
    given = ImageInput(mode_settings(mode="inpaint", strength=0.9), image, mask)
    requests = core.plan(
        ImageJob(prompt="a cup on a marble table", combination="plain", n=2, seed=5, image_input=given)
    )
    cond = requests[0].conditioning
    assert (requests[0].width, requests[0].height) == (218, 201)  # inpaint keeps the input's own size
    assert cond.image_uri == image.uri == str(Path(core.output.uri) / image.rel) and cond.mask_uri == mask.uri
    assert cond.image_sha256 == hashlib.sha256(cup).hexdigest() and cond.mask_source == "mask"
    assert [q.seed for q in requests] == [5, 6] and len({q.image_id for q in requests}) == 2
    assert stored(core) == before  # planned, not yet stored
    core.store_inputs(given)
    assert Path(cond.image_uri).read_bytes() == cup
    reread, remask = reload_inputs(cond)  # what the generator replica and `regenerate` do
    assert reread.sha256 == cond.image_sha256 and remask is not None and remask.sha256 == cond.mask_sha256
    # The same bytes under another request: the same file, the same image ids for the same seeds.
    again = core.plan(ImageJob(prompt="a cup on a marble table", combination="plain", n=2, seed=5, image_input=given))
    assert [q.image_id for q in again] == [q.image_id for q in requests]


@pytest.mark.parametrize(
    "job, status, field, words",
    [
        ({"mode": "inpaint", "mask": "wrong-size"}, 422, "mask", "is 64x64 but image"),
        ({"mode": "inpaint", "mask": "black"}, 422, "mask", "generates no pixel"),
        ({"mode": "inpaint"}, 422, "mask", "no mask image and no alpha channel"),  # an opaque JPEG alone
        ({"mode": "img2img", "mask": "black"}, 422, "mask", "img2img takes no mask"),
        ({"mode": "outpaint", "target": "7:0"}, 422, "target", ""),
        ({"mode": "outpaint", "target": "9:16", "anchor": "middle"}, 422, "anchor", "anchor 'middle' is not one of"),
        ({"mode": "upscale", "scale": 2.0, "tile": 60}, 422, "tile", "multiple of 8"),
        ({"mode": "upscale", "scale": 6.0}, 422, "scale", "larger than this server allows"),
        (
            {"mode": "inpaint", "mask": "half", "width": 256, "height": 256},
            422,
            "size",
            "leave width, height and size out",
        ),
        ({"mode": "img2img", "width": 100, "height": 128}, 422, "size", "divisible by 8"),
    ],
)
def test_inputs_a_mode_cannot_use_are_4xx_naming_the_field(core, job, status, field, words):
    before = stored(core)
    photo_jpeg = core.uploads.accept(encode(Image.fromarray(photo("chelsea", 128)), "JPEG"), "image")
    h, w = photo_jpeg.image.height, photo_jpeg.image.width
    masks = {
        "wrong-size": Image.new("L", (64, 64), 255),
        "black": Image.new("L", (w, h), 0),
        "half": Image.fromarray(np.tile(np.where(np.arange(w) < w // 2, 255, 0).astype(np.uint8), (h, 1))),
    }
    mask = core.uploads.accept(encode(masks[job["mask"]], "PNG"), "mask") if "mask" in job else None
    settings = {k: v for k, v in job.items() if k in ("mode", "target", "scale", "anchor", "tile")}
    with pytest.raises(RequestError) as err:
        given = ImageInput(mode_settings(**settings), photo_jpeg, mask)
        core.plan(ImageJob(prompt="x", width=job.get("width"), height=job.get("height"), image_input=given))
    assert (err.value.status, err.value.field) == (status, field), err.value
    assert words in err.value.message
    assert stored(core) == before


def test_settings_out_of_range_name_the_dialects_own_field():
    fields = {"image": "init_images", "strength": "denoising_strength"}
    for settings, field in [
        ({"mode": "img2img", "strength": 0.0}, "denoising_strength"),
        ({"mode": "img2img", "strength": 1.5}, "denoising_strength"),
        ({"mode": "inpaint", "mask_blur": 99}, "mask_blur"),
        ({"mode": "inpaint", "blend_px": -1}, "blend_px"),
        ({"mode": "outpaint"}, "target"),
        ({"mode": "img2img", "resize_mode": "squash"}, "resize_mode"),
    ]:
        with pytest.raises(RequestError) as err:
            mode_settings(fields, **settings)
        assert (err.value.status, err.value.field) == (422, field), (settings, err.value)


def test_masks_in_openai_and_a1111_conventions_are_redrawn_white_is_generate(core):
    before = stored(core)
    alpha = np.full((40, 60), 255, dtype=np.uint8)
    alpha[:, :20] = 0  # OpenAI: transparent = edit
    rgba = np.dstack([np.zeros((40, 60, 3), dtype=np.uint8), alpha])
    openai_mask = core.uploads.alpha_mask(core.uploads.accept(encode(Image.fromarray(rgba), "PNG"), "mask"))
    drawn = openai_mask.image.rgb[:, :, 0]
    assert (drawn[:, :20] == 255).all() and (drawn[:, 20:] == 0).all()
    with pytest.raises(RequestError, match="has no alpha channel") as err:
        core.uploads.alpha_mask(core.uploads.accept(encode(Image.new("L", (60, 40)), "PNG"), "mask"))
    assert err.value.status == 400

    white_left = np.zeros((40, 60), dtype=np.uint8)
    white_left[:, :20] = 255  # A1111: white = repaint
    plain = core.uploads.accept(encode(Image.fromarray(white_left), "PNG"), "mask")
    assert core.uploads.a1111_mask(plain, invert=False) is plain  # already the planner's convention
    inverted = core.uploads.a1111_mask(plain, invert=True).image.rgb[:, :, 0]
    assert (inverted[:, :20] == 0).all() and (inverted[:, 20:] == 255).all()
    # A1111 reads a mask with transparency by its alpha: opaque repaints.
    from_alpha = core.uploads.a1111_mask(core.uploads.accept(encode(Image.fromarray(rgba), "PNG"), "mask"), False)
    assert (from_alpha.image.rgb[:, :20, 0] == 0).all() and (from_alpha.image.rgb[:, 20:, 0] == 255).all()
    assert stored(core) == before


def test_multipart_forms_are_read_with_their_files_bytes_intact():
    blob = bytes(range(256)) * 8 + b"\r\n--boundary\r\n\r\n"
    request = httpx.Request(
        "POST",
        "http://127.0.0.1/v1/images/edits",
        files=[("image[]", ("a.png", blob, "image/png")), ("mask", ("m.png", b"\x00\r\n", "image/png"))],
        data={"prompt": "a café ☕", "n": "2"},
    )
    parts = {p.name: p for p in parse_form(request.headers["content-type"], request.read())}
    assert parts["image[]"].data == blob and parts["image[]"].filename == "a.png" and parts["mask"].data == b"\x00\r\n"
    assert parts["prompt"].text == "a café ☕" and parts["n"].text == "2" and parts["prompt"].filename is None
    with pytest.raises(RequestError, match="send multipart/form-data") as err:
        parse_form("application/json", b"{}")
    assert err.value.status == 400
    with pytest.raises(RequestError, match="without a boundary"):
        parse_form("multipart/form-data", b"")


def test_an_img2img_without_a_size_renders_at_its_inputs_size_fitted_in_the_limits():
    assert fitted_size(218, 201, 2048, 2048 * 2048) == (216, 200)
    assert fitted_size(4000, 3000, 1024, 2048 * 2048) == (1024, 768)
    assert fitted_size(3000, 3000, 4096, 1024 * 1024) == (1024, 1024)
    assert fitted_size(30, 218, 2048, 2048 * 2048) == (64, 216)


def test_malformed_multipart_bodies_are_400s_naming_the_body():
    rng = np.random.default_rng(7)
    bodies = [
        b"",
        b"--b\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--b--\r\n",
        b"--b\r\nContent-Disposition: form-data; name*=utf-8''%FF%FE\r\n\r\nx\r\n--b--\r\n",
        b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nnested\r\n--c--\r\n--b--\r\n",
        *(bytes(rng.integers(0, 256, 300, dtype=np.uint8)) for _ in range(20)),
    ]
    for body in bodies:
        try:
            parts = parse_form("multipart/form-data; boundary=b", body)
        except RequestError as e:
            assert e.status == 400 and e.field == "body", e
        else:
            assert all(isinstance(p.data, bytes) and p.name for p in parts)
