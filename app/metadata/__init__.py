"""Provenance metadata in image files: what made an image, written so that other tools read it.

Every file imagefab writes carries, for one `ImageMetadata` (`record.py`):

- AUTOMATIC1111's `parameters` infotext (`infotext.py`), the de-facto format read by A1111,
  ComfyUI importers, Civitai and most image browsers: a PNG text chunk (`png.py`), or the EXIF
  UserComment in JPEG and WebP (`exif.py`);
- the full `ImageMetadata` as JSON (PNG iTXt `imagefab`, and inside the XMP packet);
- an XMP packet (`xmp.py`) declaring the IPTC digital source type "trainedAlgorithmicMedia", the
  marker platforms read to label AI-generated images.

The encoder that puts them into files is `app.postprocess.encode_image`; `read_metadata` reads
them back from encoded bytes (also from A1111's own files).
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from app.metadata.exif import read_exif
from app.metadata.infotext import format_infotext, parse_infotext
from app.metadata.png import XMP_CHUNK, read_png
from app.metadata.record import ImageMetadata, LoraRef
from app.metadata.xmp import DIGITAL_SOURCE_TYPE, parse_xmp

__all__ = [
    "DIGITAL_SOURCE_TYPE",
    "ImageMetadata",
    "LoraRef",
    "format_infotext",
    "parse_infotext",
    "read_metadata",
]


def read_metadata(data: bytes) -> dict[str, Any]:
    """Read back what `encode_image` embeds (also from A1111 files).

    Returns "format" ("PNG", "JPEG" or "WEBP") and, when present: "parameters" (infotext),
    "imagefab" (metadata JSON as a dict), "digital_source_type" (from XMP).
    Raises ValueError for bytes that are not a readable PNG/JPEG/WebP.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP"))
        image.load()  # PNG text chunks after the pixel data are only read by load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read metadata from {len(data)} bytes: {e}") from e

    result: dict[str, Any] = {"format": image.format}
    result.update(read_png(image) if image.format == "PNG" else read_exif(image))
    xmp = image.info.get("xmp") or image.info.get(XMP_CHUNK)
    if xmp:
        for key, value in parse_xmp(xmp).items():
            result.setdefault(key, value)
    return result
