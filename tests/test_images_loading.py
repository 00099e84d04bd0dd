"""Loading input images: locations, limits checked before decoding, normalisation, named errors."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from icc_profiles import cmyk_profile, naive_rgb
from photos import photo
from PIL import Image, ImageCms

from app.conditioning import ConditioningError, InputLimits, load_input_image
from app.conditioning.loading import decode_input_image

REPO = Path(__file__).resolve().parents[1]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: what a decompression bomb's
    header looks like, without the gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def astronaut_png(tmp_path):
    data = encode(Image.fromarray(photo("astronaut", 128)), "PNG")
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "astronaut.png").write_bytes(data)
    return tmp_path, data


def test_relative_absolute_and_file_uri_give_the_same_image(astronaut_png):
    folder, data = astronaut_png
    relative = load_input_image("inputs/astronaut.png", base_dir=folder)
    absolute = load_input_image(str(folder / "inputs" / "astronaut.png"))
    file_uri = load_input_image(f"file://{folder}/inputs/astronaut.png")
    assert relative.sha256 == absolute.sha256 == file_uri.sha256 == hashlib.sha256(data).hexdigest()
    assert np.array_equal(relative.pixels, photo("astronaut", 128))
    assert (relative.width, relative.height, relative.format, relative.conversions) == (128, 128, "PNG", ())
    assert relative.uri == "inputs/astronaut.png" and relative.alpha is None
    assert not relative.pixels.flags.writeable


def test_missing_files_and_bad_locations_are_named(tmp_path):
    with pytest.raises(ConditioningError, match="image_missing: inputs/none.png: no such file") as e:
        load_input_image("inputs/none.png", base_dir=tmp_path)
    assert e.value.reason == "image_missing" and e.value.http_status == 422
    with pytest.raises(ConditioningError, match="is a folder"):
        load_input_image(str(tmp_path))
    with pytest.raises(ConditioningError, match="image_uri: the input image location is empty"):
        load_input_image(" ")
    with pytest.raises(ConditioningError, match="image_uri: photo.png is a relative path and no base folder"):
        load_input_image("photo.png")
    with pytest.raises(ConditioningError, match="image_uri: nosuch://bucket/a.png: cannot open its filesystem"):
        load_input_image("nosuch://bucket/a.png")


def test_errors_survive_pickling_with_their_reason():
    error = pickle.loads(pickle.dumps(ConditioningError("mask_size", "mask is 8x8 but image is 16x16")))
    assert (error.reason, str(error)) == ("mask_size", "mask_size: mask is 8x8 but image is 16x16")
    with pytest.raises(ValueError, match="unknown conditioning error reason 'nope'"):
        ConditioningError("nope", "x")


def test_byte_limit_is_checked_before_reading_and_while_reading(astronaut_png):
    folder, data = astronaut_png
    limits = InputLimits(max_bytes=len(data) - 1)
    with pytest.raises(ConditioningError, match=f"is {len(data)} bytes, over max_bytes={len(data) - 1}") as e:
        load_input_image("inputs/astronaut.png", folder, limits)
    assert e.value.reason == "image_too_large" and e.value.http_status == 413
    with pytest.raises(ConditioningError, match="image_too_large"):
        decode_input_image(data, "upload", limits)
    assert load_input_image("inputs/astronaut.png", folder, InputLimits(max_bytes=len(data))).width == 128


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    header = png_header_only(3000, 2000)  # its data would be truncated: decoding it would fail otherwise
    with pytest.raises(ConditioningError, match=r"is 3000x2000 = 6000000 pixels, over max_pixels=1000000") as e:
        decode_input_image(header, "big.png", InputLimits(max_pixels=1_000_000))
    assert e.value.reason == "image_pixels"
    # beyond Pillow's own bomb guard (2 × Image.MAX_IMAGE_PIXELS) its error is ours too
    bomb = png_header_only(20_000, 20_000)
    with pytest.raises(ConditioningError, match="image_pixels: bomb.png: decompression bomb refused"):
        decode_input_image(bomb, "bomb.png", InputLimits(max_pixels=10**12))
    # and the same header within the limits is decoded, found truncated, and named
    with pytest.raises(ConditioningError, match="image_unreadable: big.png: cannot decode PNG data"):
        decode_input_image(header, "big.png")


def test_truncated_and_non_image_data_are_unreadable(astronaut_png):
    _, data = astronaut_png
    jpeg = encode(Image.fromarray(photo("coffee", 256)), "JPEG", quality=90)
    for name, broken in (("cut.png", data[: len(data) // 2]), ("cut.jpg", jpeg[: len(jpeg) // 2])):
        with pytest.raises(ConditioningError, match=f"image_unreadable: {name}: cannot decode"):
            decode_input_image(broken, name)
    with pytest.raises(ConditioningError, match=r"image_format: notes.txt: not a recognisable image \(allowed: PNG"):
        decode_input_image(b"just some text, not pixels", "notes.txt")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt):
    data = encode(Image.fromarray(photo("chelsea", 64)), fmt)
    with pytest.raises(ConditioningError, match=f"format {fmt} is not allowed \\(allowed: PNG, JPEG, WEBP\\)") as e:
        decode_input_image(data, f"cat.{fmt.lower()}")
    assert e.value.http_status == 415


def test_allowed_formats_are_a_limit():
    webp = encode(Image.fromarray(photo("chelsea", 64)), "WEBP", lossless=True)
    assert decode_input_image(webp, "cat.webp").format == "WEBP"
    with pytest.raises(ConditioningError, match=r"format WEBP is not allowed \(allowed: PNG, JPEG\)"):
        decode_input_image(webp, "cat.webp", InputLimits(formats=("PNG", "JPEG")))
    with pytest.raises(ValueError, match="formats must be a non-empty subset"):
        InputLimits(formats=("GIF",))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_are_refused(fmt):
    frames = [Image.fromarray(photo(name, 64)) for name in ("chelsea", "coffee")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with pytest.raises(ConditioningError, match=f"image_animated: anim: is an animated {fmt} with 2 frames"):
        decode_input_image(buffer.getvalue(), "anim:")


def test_exif_orientation_is_applied():
    pixels = photo("astronaut", 96)[:, :64]  # [96, 64, 3]: not square, so a rotation shows in the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90° clockwise
    data = encode(Image.fromarray(pixels), "PNG", exif=exif)
    image = decode_input_image(data, "turned.png")
    assert image.conversions == ("exif_orientation=6",)
    assert (image.width, image.height) == (96, 64)
    assert np.array_equal(image.pixels, np.rot90(pixels, k=-1))


def test_no_ray_and_no_torch_are_imported():
    code = "import sys, app.conditioning; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_cmyk_becomes_rgb_plainly_without_a_usable_profile():
    rgb = Image.fromarray(photo("coffee", 64))
    cmyk = rgb.convert("CMYK")
    plain = decode_input_image(encode(cmyk, "JPEG", quality=95), "cmyk.jpg")
    assert (plain.source_mode, plain.conversions, plain.pixels.shape) == ("CMYK", ("cmyk_to_rgb=plain",), (43, 64, 3))
    assert np.abs(plain.pixels.astype(int) - photo("coffee", 64)).mean() < 4  # JPEG loss only
    # an embedded profile for another colour space is not applied, and the record says why
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = decode_input_image(encode(cmyk, "JPEG", quality=95, icc_profile=srgb), "tagged.jpg")
    assert tagged.conversions[0].startswith("cmyk_to_rgb=plain (embedded profile unusable: embedded profile is RGB")
    assert np.array_equal(tagged.pixels, plain.pixels)


def test_cmyk_with_an_embedded_cmyk_profile_is_converted_through_it():
    cmyk = Image.fromarray(photo("coffee", 64)).convert("CMYK")
    plain = decode_input_image(encode(cmyk, "JPEG", quality=95), "plain.jpg")
    # a profile that describes Pillow's own formula gives (nearly) the same colours…
    same = decode_input_image(encode(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile()), "same.jpg")
    assert same.conversions == ("cmyk_to_rgb=icc",)
    assert np.abs(same.pixels.astype(int) - plain.pixels).mean() < 1.5
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down: the profile survives the rotation
    turned = encode(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile(), exif=exif)
    upright = decode_input_image(turned, "turned.jpg")
    assert upright.conversions == ("exif_orientation=3", "cmyk_to_rgb=icc")
    assert np.array_equal(upright.pixels, same.pixels[::-1, ::-1])
    # …and one whose cyan and magenta inks are swapped is followed, not ignored
    swapped = cmyk_profile(lambda inks: naive_rgb(inks[:, [1, 0, 2, 3]]))
    followed = decode_input_image(encode(cmyk, "JPEG", quality=95, icc_profile=swapped), "swapped.jpg")
    assert followed.conversions == ("cmyk_to_rgb=icc",)
    assert np.abs(followed.pixels.astype(int) - plain.pixels[:, :, [1, 0, 2]]).mean() < 1.5
    assert np.abs(followed.pixels.astype(int) - plain.pixels).mean() > 10


def test_sixteen_bit_greyscale_becomes_eight_bit_rgb():
    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    image = decode_input_image(encode(Image.fromarray(wide), "PNG"), "grey16.png")
    assert (image.source_mode, image.conversions) == ("I;16", ("16bit_to_8bit",))
    expected = np.rint(wide / 65535 * 255).astype(np.uint8)
    assert image.pixels.shape == (64, 64, 3) and np.array_equal(image.pixels[:, :, 1], expected)


def test_palette_with_transparency_becomes_rgba_and_without_it_rgb():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[8:24, 8:24] = (200, 30, 40, 255)  # an opaque red square on a transparent ground
    palette = Image.fromarray(rgba).convert("P")  # Pillow keeps the transparent index
    image = decode_input_image(encode(palette, "PNG"), "cutout.png")
    assert image.source_mode == "P" and image.conversions == ("palette_to_rgba",)
    assert image.alpha is not None and np.array_equal(image.alpha, rgba[:, :, 3])
    assert np.array_equal(image.rgb[8:24, 8:24], np.broadcast_to([200, 30, 40], (16, 16, 3)))
    flat = decode_input_image(encode(Image.fromarray(photo("chelsea", 32)).convert("P"), "PNG"), "flat.png")
    assert flat.pixels.shape == (21, 32, 3) and flat.conversions == ()


def test_greyscale_with_alpha_keeps_its_alpha():
    la = np.stack([np.full((16, 16), 90, np.uint8), np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))], -1)
    image = decode_input_image(encode(Image.fromarray(la, mode="LA"), "PNG"), "la.png")
    assert image.pixels.shape == (16, 16, 4) and np.array_equal(image.alpha, la[:, :, 1])
    assert (image.rgb == 90).all()


def test_s3_objects_load_and_a_vanished_one_is_named():
    moto_s3 = pytest.importorskip("moto_s3")
    import pyarrow.fs as pafs

    data = encode(Image.fromarray(photo("rocket", 96)), "PNG")
    with moto_s3.loopback_s3("inputs") as address:
        fs = pafs.S3FileSystem(endpoint_override=address, scheme="http")
        with fs.open_output_stream("inputs/products/rocket.png") as f:
            f.write(data)
        image = load_input_image("s3://inputs/products/rocket.png")
        assert image.sha256 == hashlib.sha256(data).hexdigest() and image.uri == "s3://inputs/products/rocket.png"
        assert np.array_equal(image.pixels, photo("rocket", 96))
        with pytest.raises(ConditioningError, match="image_too_large: s3://inputs/products/rocket.png is"):
            load_input_image("s3://inputs/products/rocket.png", limits=InputLimits(max_bytes=1000))
        fs.delete_file("inputs/products/rocket.png")
        with pytest.raises(ConditioningError, match="image_missing: s3://inputs/products/rocket.png: no such"):
            load_input_image("s3://inputs/products/rocket.png")
