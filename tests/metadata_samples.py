"""A sample `ImageMetadata` whose prompt breaks naive XML, A1111 quoting and Latin-1 text chunks."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image

from app.metadata import ImageMetadata

# Everything that breaks naive XML, A1111 quoting or Latin-1 text chunks.
NASTY_PROMPT = 'a "cat" <b>&amp; & dog, watercolor: soft\nsecond line\twith tab, 猫と犬 🐱 naïve'
MODEL_SHA = hashlib.sha256(b"sd_xl_base_1.0.safetensors").hexdigest()
LORA_SHA = hashlib.sha256(b"watercolor.safetensors").hexdigest()


def make_metadata(**overrides) -> ImageMetadata:
    fields: dict[str, Any] = dict(
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


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
