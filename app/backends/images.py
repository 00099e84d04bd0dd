"""Decoding a provider's image body into pixels: [H, W, 3] uint8, or a bad_response error."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.backends.base import BackendError


def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BackendError("bad_response", f"{where}: the image body is not a readable image ({e})") from None
    return np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]


def decode_b64_image(text: object, where: str) -> np.ndarray:
    if not isinstance(text, str) or not text:
        raise BackendError("bad_response", f"{where}: no base64 image in the answer")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError("bad_response", f"{where}: the image is not valid base64") from None
    return decode_image(raw, where)
