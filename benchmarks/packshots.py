"""Product cut-outs from real photographs, and packshots made of them: a product on pure white.

The normal e-commerce shot is a product photographed (or cut out) on a plain white background,
often with a soft contact shadow. These are built from scikit-image's photographs: each
product's mask comes from a simple segmentation of its photo (a threshold, or the ellipses of a
cup and its saucer), so its edges, texture and highlights are a camera's, not a drawing's.

Used by `benchmarks/qc_eval.py` (packshots must be accepted by QC) and
`benchmarks/make_packshots.py` (the example RGBA assets in specs/data/packshots/).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import filters


@dataclass(frozen=True)
class Cutout:
    """A product: RGB pixels `[H, W, 3]` uint8 and its mask `[H, W]` float32 in 0..1, cropped to it."""

    name: str
    rgb: np.ndarray
    mask: np.ndarray


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("the segmentation found no region")
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _ellipse(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((cols - center[0]) / radii[0]) ** 2 + ((rows - center[1]) / radii[1]) ** 2 <= 1.0


def _crop_to(rgb: np.ndarray, mask: np.ndarray, name: str) -> Cutout:
    """Crop to the mask's bounding box; the mask edge is feathered by one pixel (a cut-out's antialiasing)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)
    return Cutout(name, np.ascontiguousarray(rgb[box]), np.clip(soft[box], 0.0, 1.0))


def coffee_cup() -> Cutout:
    """The cup and saucer of `coffee`: two ellipses fitted by eye to the saucer and the cup's rim."""
    rgb = skdata.coffee()  # [400, 600, 3]
    mask = _ellipse(rgb.shape[:2], (278, 228), (201, 160)) | _ellipse(rgb.shape[:2], (291, 112), (119, 96))
    return _crop_to(rgb, mask, "coffee_cup")


def rocket() -> Cutout:
    """The rocket of `rocket`: the bright body against the dusk sky (luma threshold in its column)."""
    rgb = skdata.rocket()  # [427, 640, 3]
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    column = np.zeros(luma.shape, bool)
    column[120:400, 300:342] = True
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(column & (luma > 110), iterations=3))
    return _crop_to(rgb, _largest_region(mask), "rocket")


def coin() -> Cutout:
    """The large coin on the right of `coins`: Otsu threshold of its neighbourhood, holes filled."""
    gray = skdata.coins()  # [303, 384]
    near = np.zeros(gray.shape, bool)
    near[140:235, 300:384] = True
    mask = near & (gray > filters.threshold_otsu(gray[near]))
    mask = _largest_region(ndimage.binary_fill_holes(ndimage.binary_opening(mask, iterations=2)))
    return _crop_to(np.stack([gray] * 3, axis=-1), mask, "coin")


def helmet() -> Cutout:
    """The black helmet of `astronaut` (bottom right, cut by the frame): a disc, the frame's edges kept."""
    rgb = skdata.astronaut()  # [512, 512, 3]
    mask = _ellipse(rgb.shape[:2], (428, 428), (86, 86))
    mask[:, 505:] = False  # the frame's own dark border column
    return _crop_to(rgb, mask, "helmet")


CUTOUTS = {"coffee_cup": coffee_cup, "rocket": rocket, "coin": coin, "helmet": helmet}


# A product is enlarged at most this much from its photo (the 1024 px copies of the photographs
# in `qc_eval` are enlarged up to 2.6x); more would be an upscaling blur QC is right to report.
MAX_UPSCALE = 2.3


def packshot(
    cut: Cutout, side: int, fill: float = 0.7, shadow: float = 0.25, aspect: float = 1.0, alpha: bool = False
) -> np.ndarray:
    """`cut` centred on pure white, its longer side `fill` of the canvas (at most `MAX_UPSCALE`
    times its photographed size), a soft shadow below.

    The canvas is `side` px on its longer side (`aspect` = width / height). The shadow is the
    product's mask squashed to a flat ellipse at its foot, blurred, darkening white by at most
    `shadow`. With `alpha`, an RGBA image whose alpha is the product's mask (no shadow, transparent
    background) instead.
    """
    width, height = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
    scale = min(fill * min(width, height) / max(cut.rgb.shape[:2]), MAX_UPSCALE)
    size = (max(1, round(cut.rgb.shape[1] * scale)), max(1, round(cut.rgb.shape[0] * scale)))
    product = np.asarray(Image.fromarray(cut.rgb).resize(size, Image.Resampling.LANCZOS)).astype(np.float32)
    mask = np.asarray(Image.fromarray(cut.mask, mode="F").resize(size, Image.Resampling.BILINEAR))
    mask = np.clip(mask, 0.0, 1.0)[:, :, None]
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    box = (slice(top, top + size[1]), slice(left, left + size[0]))
    if alpha:
        out = np.zeros((height, width, 4), np.uint8)
        out[(*box, slice(0, 3))] = np.rint(product).astype(np.uint8)
        out[(*box, 3)] = np.rint(mask[:, :, 0] * 255).astype(np.uint8)
        return out

    canvas = np.full((height, width, 3), 255.0, np.float32)
    if shadow > 0:
        # contact shadow: an ellipse as wide as the product, a tenth as tall, at its foot
        foot = np.zeros((height, width), np.float32)
        center = (width / 2, min(height - 1.0, top + size[1] * 0.97))
        foot[_ellipse((height, width), center, (size[0] * 0.45, max(2.0, size[1] * 0.05)))] = 1.0
        foot = ndimage.gaussian_filter(foot, max(1.0, size[0] * 0.04))
        canvas *= 1.0 - shadow * (foot / max(float(foot.max()), 1e-6))[:, :, None]
    canvas[box] = product * mask + canvas[box] * (1.0 - mask)
    return np.rint(canvas).astype(np.uint8)
