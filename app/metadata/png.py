"""PNG text chunks: `parameters` (the A1111 infotext; Pillow stores it as iTXt when it is not
Latin-1, as A1111 does), iTXt `imagefab` (the `ImageMetadata` JSON) and iTXt `XML:com.adobe.xmp`
(the XMP packet)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.metadata.infotext import format_infotext
from app.metadata.record import ImageMetadata

XMP_CHUNK = "XML:com.adobe.xmp"


def png_info(metadata: ImageMetadata | None, xmp: bytes) -> PngInfo:
    """The text chunks of a PNG: infotext and JSON with metadata, the XMP packet always."""
    info = PngInfo()
    if metadata is not None:
        info.add_text("parameters", format_infotext(metadata))
        info.add_itxt("imagefab", metadata.to_json())
    info.add_itxt(XMP_CHUNK, xmp.decode("utf-8"))
    return info


def read_png(image: Image.Image) -> dict[str, Any]:
    """The infotext ("parameters") and the JSON ("imagefab", as a dict) of a decoded PNG, when present.

    PNG text chunks after the pixel data are only read by `image.load()`.
    """
    found: dict[str, Any] = {}
    parameters = image.info.get("parameters")
    if isinstance(parameters, str):
        found["parameters"] = parameters
    if isinstance(image.info.get("imagefab"), str):
        with contextlib.suppress(json.JSONDecodeError):
            found["imagefab"] = json.loads(image.info["imagefab"])
    return found
