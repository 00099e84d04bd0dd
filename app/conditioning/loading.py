"""Loading an input image: bounded read from a path or any pyarrow filesystem URI, checks before
decoding, and one normalised pixel form (RGB or RGBA, uint8, upright).

Order matters for safety: the bytes are read with a bound (never the whole object first), the
format and the dimensions come from the header (`Image.open` decodes nothing), and only an image
within every limit is decoded. Pillow's own `Image.MAX_IMAGE_PIXELS` guard stays as it is (global
state is not ours to change); its `DecompressionBombError` is turned into `image_pixels` too.

Normalisation, recorded in `InputImage.conversions` in the order applied:
- EXIF orientation applied (`exif_orientation=N`), so pixels are as a viewer shows them;
- CMYK → RGB through the embedded ICC profile with littlecms (`cmyk_to_rgb=icc`) when the image
  carries a CMYK profile that ImageCms can use, else Pillow's plain formula (`cmyk_to_rgb=plain`);
- 16-bit greyscale → 8-bit by rounding v·255/65535 (`16bit_to_8bit`); Pillow already reduces
  16-bit RGB PNGs to 8 bits when it decodes them;
- palette with transparency → RGBA (`palette_to_rgba`), other palettes and greyscale → RGB;
- an alpha channel is kept (it can be the inpainting mask); `rgb` drops it.
Animated images (APNG, animated WebP) are refused: which frame shows the product is not knowable.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from app.conditioning.errors import ConditioningError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000  # width·height from the header, checked before decoding
    formats: tuple[str, ...] = SUPPORTED_FORMATS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive, got max_bytes={self.max_bytes} max_pixels={self.max_pixels}")
        unknown = [f for f in self.formats if f not in SUPPORTED_FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {SUPPORTED_FORMATS}, got {self.formats}")


@dataclass(frozen=True, eq=False)
class InputImage:
    uri: str  # as the request gave it
    sha256: str  # of the bytes read, so an image_id can cover the input
    format: str  # PNG | JPEG | WEBP
    source_mode: str  # Pillow's mode before normalisation (CMYK, I;16, P, …)
    conversions: tuple[str, ...]  # what normalisation did, in order
    pixels: np.ndarray = field(repr=False)  # [H, W, 3|4] uint8, read-only

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def rgb(self) -> np.ndarray:  # [H, W, 3]
        return self.pixels[:, :, :3]

    @property
    def alpha(self) -> np.ndarray | None:  # [H, W] or None
        return self.pixels[:, :, 3] if self.pixels.shape[2] == 4 else None


def load_input_image(uri: str, base_dir: str | Path | None = None, limits: InputLimits | None = None) -> InputImage:
    """Read, check and normalise the image at `uri`: a path (relative ones are taken from
    `base_dir`, the spec's folder), `file://…`, or any pyarrow filesystem URI (`s3://bucket/key`)."""
    limits = limits or InputLimits()
    data = read_bounded(uri, base_dir, limits.max_bytes)
    return decode_input_image(data, uri, limits)


def read_bounded(uri: str, base_dir: str | Path | None, max_bytes: int) -> bytes:
    """The bytes at `uri`, reading at most `max_bytes + 1` of them."""
    if not uri or not uri.strip():
        raise ConditioningError("image_uri", "the input image location is empty")
    try:
        fs, path = _filesystem(uri, base_dir)
    except ConditioningError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes, bad buckets
        raise ConditioningError("image_uri", f"{uri}: cannot open its filesystem ({e})") from e
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ConditioningError("image_missing", f"{uri}: no such file or object")
        if info.type == pafs.FileType.Directory:
            raise ConditioningError("image_missing", f"{uri} is a folder, not an image file")
        if info.size is not None and info.size > max_bytes:
            raise ConditioningError("image_too_large", f"{uri} is {info.size} bytes, over max_bytes={max_bytes}")
        with fs.open_input_stream(path) as stream:
            data = stream.read(max_bytes + 1)
    except ConditioningError:
        raise
    except FileNotFoundError as e:  # vanished between the look-up and the read
        raise ConditioningError("image_missing", f"{uri}: no such file or object") from e
    except OSError as e:
        raise ConditioningError("image_unreadable", f"{uri}: cannot read ({e})") from e
    if len(data) > max_bytes:  # grew after the look-up, or a filesystem that reports no size
        raise ConditioningError("image_too_large", f"{uri} is over max_bytes={max_bytes} bytes")
    return data


def resolve_uri(uri: str, base_dir: str | Path | None) -> str:
    """`uri` as the catalog records it: a filesystem URI unchanged, a path made absolute (a
    relative one from `base_dir`), so any worker can read it again."""
    if not uri or not uri.strip():
        raise ConditioningError("image_uri", "the input image location is empty")
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return _filesystem(uri, base_dir)[1]


def _filesystem(uri: str, base_dir: str | Path | None) -> tuple[pafs.FileSystem, str]:
    if "://" in uri and not uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    path = Path(uri.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            raise ConditioningError("image_uri", f"{uri} is a relative path and no base folder was given")
        path = Path(base_dir) / path
    return pafs.LocalFileSystem(), os.path.abspath(path)


def decode_input_image(data: bytes, uri: str, limits: InputLimits | None = None) -> InputImage:
    """Check the header of `data` against `limits`, then decode and normalise it."""
    limits = limits or InputLimits()
    if len(data) > limits.max_bytes:
        raise ConditioningError("image_too_large", f"{uri} is {len(data)} bytes, over max_bytes={limits.max_bytes}")
    image = _open_checked(data, uri, limits)
    source_format, source_mode = str(image.format), image.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ConditioningError("image_pixels", f"{uri}: decompression bomb refused ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ConditioningError("image_unreadable", f"{uri}: cannot decode {image.format} data ({e})") from e
    conversions: list[str] = []
    image = _upright(image, conversions)
    pixels = _normalised_pixels(image, conversions)  # [H, W, 3|4] uint8
    pixels.flags.writeable = False
    return InputImage(
        uri=uri,
        sha256=hashlib.sha256(data).hexdigest(),
        format=source_format,
        source_mode=source_mode,
        conversions=tuple(conversions),
        pixels=pixels,
    )


def _open_checked(data: bytes, uri: str, limits: InputLimits) -> Image.Image:
    """`Image.open` (header only) restricted to the allowed formats, then the size and frame checks."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except Image.DecompressionBombError as e:
        raise ConditioningError("image_pixels", f"{uri}: decompression bomb refused ({e})") from e
    except UnidentifiedImageError:
        raise ConditioningError("image_format", f"{uri}: {_refusal(data, limits)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ConditioningError("image_unreadable", f"{uri}: cannot read the image header ({e})") from e
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ConditioningError(
            "image_pixels", f"{uri} is {width}x{height} = {width * height} pixels, over max_pixels={limits.max_pixels}"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ConditioningError("image_animated", f"{uri} is an animated {image.format} with {frames} frames")
    return image


def _refusal(data: bytes, limits: InputLimits) -> str:
    """Name the format of data Pillow could not open as an allowed one (the header only)."""
    allowed = ", ".join(limits.formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as other:
                return f"format {other.format} is not allowed (allowed: {allowed})"
    except Exception:
        return f"not a recognisable image (allowed: {allowed})"


def _upright(image: Image.Image, conversions: list[str]) -> Image.Image:
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        upright = ImageOps.exif_transpose(image)
        conversions.append(f"exif_orientation={orientation}")
        return upright
    return image


def _normalised_pixels(image: Image.Image, conversions: list[str]) -> np.ndarray:
    mode = image.mode
    if mode == "CMYK":
        image = _cmyk_to_rgb(image, conversions)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(image).astype(np.int64)  # [H, W]
        narrow = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        conversions.append("16bit_to_8bit")
        image = Image.fromarray(narrow, mode="L")
    elif mode == "P" and "transparency" in image.info:
        conversions.append("palette_to_rgba")
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a copy: [H, W, 3|4]


def _cmyk_to_rgb(image: Image.Image, conversions: list[str]) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if profile.profile.xcolor_space.strip() != "CMYK":
                raise ImageCms.PyCMSError(f"embedded profile is {profile.profile.xcolor_space.strip()}, not CMYK")
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            converted = ImageCms.profileToProfile(image, profile, srgb, outputMode="RGB")
            if converted is not None:
                conversions.append("cmyk_to_rgb=icc")
                return converted
        except (ImageCms.PyCMSError, OSError, TypeError, ValueError) as e:
            conversions.append(f"cmyk_to_rgb=plain (embedded profile unusable: {e})")
            return image.convert("RGB")
    conversions.append("cmyk_to_rgb=plain")
    return image.convert("RGB")
