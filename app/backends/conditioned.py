"""Image-conditioned requests on remote backends: the same inputs, the same kept pixels.

A remote backend is sent what imagefab's own pipeline would be given (`prepare`: the init image at
the render size, the canvas of an outpaint, the mask with white = generate) and its answer is
finished the same way (`finish`: the kept region pasted back byte for byte outside the blend band,
the canvas's padding cropped, the kept-region and seam measures taken). So a provider that redraws
the product anyway cannot change it in the output, and QC and the catalog see the same measures
whichever backend rendered. An answer at another size than the render size is resized to it
first, and `width`/`height` are recorded as unhonoured.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from app.backends.base import BackendError, BackendResult
from app.conditioning.errors import ConditioningError
from app.conditioning.plan import Prepared, finish, prepare, reload_inputs
from app.request import RenderRequest


def prepared_inputs(request: RenderRequest, where: str) -> Prepared:
    """The request's inputs read again (sha256 checked) and prepared; a bad one fails the row."""
    assert request.conditioning is not None
    try:
        image, mask = reload_inputs(request.conditioning)
        return prepare(request.conditioning, image, mask, request.width, request.height)
    except ConditioningError as e:
        raise BackendError("invalid", f"{where}: bad_input: {e}") from None


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


def completed(result: BackendResult, prepared: Prepared) -> BackendResult:
    """The provider's answer finished like the diffusers generator's: at the render size, kept
    pixels pasted back, measured."""
    if result.image is None:
        return result
    pixels = result.image
    width, height = prepared.render_size
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))
        if "width" not in result.lineage.unhonoured:
            result.lineage = replace(result.lineage, unhonoured=(*result.lineage.unhonoured, "width", "height"))
    result.image, result.measures = finish(prepared, np.ascontiguousarray(pixels))
    return result
