"""Real photographs for QC tests: scikit-image's sample images at a chosen size."""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image
from skimage import data as skdata


@cache
def photo(name: str, longer_side: int = 512) -> np.ndarray:
    """`skimage.data.<name>()` as RGB uint8 [H, W, 3], resized so its longer side is `longer_side`."""
    pixels = getattr(skdata, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    image = Image.fromarray(pixels[:, :, :3])
    scale = longer_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    resized = np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    resized.flags.writeable = False  # shared between tests through the cache
    return resized
