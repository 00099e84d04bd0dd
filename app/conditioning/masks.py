"""Inpainting masks: which pixels the model generates and which it keeps.

A mask here is a boolean array [H, W], True = generate. From a mask image the A1111/diffusers
convention holds (white = generate, black = keep); from an image's alpha channel, transparent =
generate, opaque = keep. Grey values and partial alpha are thresholded at 128 (mid-grey and above
generates; alpha below 128 generates): the kept set has to be definite for "kept pixels are the
original's bytes" to be a checkable promise. Soft edges come from two other places: `model_mask`
blurs what the model is given (A1111's `mask_blur`), and `paste_back` feathers the seam.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from app.conditioning.errors import ConditioningError
from app.conditioning.loading import InputImage

THRESHOLD = 128


def mask_from_image(mask: InputImage, image: InputImage) -> np.ndarray:
    """[H, W] bool, True = generate: the mask image's luminance ≥ 128 (its alpha is ignored)."""
    if (mask.width, mask.height) != (image.width, image.height):
        raise ConditioningError(
            "mask_size",
            f"mask {mask.uri} is {mask.width}x{mask.height} but image {image.uri} is {image.width}x{image.height}",
        )
    luminance = np.asarray(Image.fromarray(np.ascontiguousarray(mask.rgb)).convert("L"))  # [H, W]
    generate = luminance >= THRESHOLD
    check_mask(generate, mask.uri)
    return generate


def mask_from_alpha(image: InputImage) -> np.ndarray:
    """[H, W] bool, True = generate: the image's alpha below 128 (transparent pixels)."""
    if image.alpha is None:
        raise ConditioningError("mask_keeps_none", f"{image.uri} has no alpha channel to take the mask from")
    generate = image.alpha < THRESHOLD
    check_mask(generate, f"alpha of {image.uri}")
    return generate


def check_mask(generate: np.ndarray, name: str) -> None:
    """A mask must generate something and keep something."""
    if not generate.any():
        raise ConditioningError("mask_keeps_all", f"{name} generates no pixel (all black / opaque): nothing to do")
    if generate.all():
        raise ConditioningError(
            "mask_keeps_none", f"{name} keeps no pixel (all white / transparent): use txt2img or img2img instead"
        )


def model_mask(generate: np.ndarray, blur_px: float = 0.0) -> np.ndarray:
    """[H, W] uint8 mask for the pipeline (255 = generate), Gaussian-blurred with radius `blur_px`
    like A1111's `mask_blur` and diffusers' `mask_processor.blur`. Only what the model sees is
    soft; the kept set for paste-back stays `generate`."""
    if blur_px < 0:
        raise ValueError(f"blur_px must be ≥ 0, got {blur_px}")
    mask = Image.fromarray(np.where(generate, 255, 0).astype(np.uint8))
    if blur_px > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur_px))
    return np.asarray(mask)


def distance_inside(region: np.ndarray) -> np.ndarray:
    """[H, W] float: for each pixel of `region`, the Euclidean distance to the nearest pixel
    outside it (1.0 next to the border); 0 outside. With no pixel outside, +inf inside."""
    if region.all():
        return np.full(region.shape, np.inf)
    return ndimage.distance_transform_edt(region)
