"""Image-conditioned requests on remote backends: the same inputs, the same kept pixels.

A remote backend is sent what imagefab's own pipeline would be given (`prepare`: the init image at
the render size, the canvas of an outpaint, the mask with white = generate) and its answer is
finished the same way (`finish`: the kept region pasted back byte for byte outside the blend band,
the canvas's padding cropped, the kept-region and seam measures taken). So a provider that redraws
the product anyway cannot change it in the output, and QC and the catalog see the same measures
whichever backend rendered. An answer at another size than the render size is resized to it
first, and `width`/`height` are recorded as unhonoured (`RemoteBackend` in base.py does both ends;
here are the encodings the providers are sent).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.conditioning.plan import Prepared


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(prepared: Prepared, transparent_edits: bool = False) -> bytes:
    """The mask as PNG: white = generate (A1111, Stability), or with `transparent_edits` an RGBA
    image whose transparent pixels are the ones to edit (OpenAI's convention)."""
    if prepared.generate is None:
        raise ValueError(f"mode {prepared.mode} has no mask")
    if transparent_edits:
        rgba = np.zeros((*prepared.generate.shape, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(prepared.generate, 0, 255)
        return png(rgba)
    return png(np.where(prepared.generate, 255, 0).astype(np.uint8))
