"""Outpainting geometry: extend an image to a platform's ratio or an exact size.

The canvas holds the original at its own resolution (shrunk only when an exact target is smaller
than the image), placed by an anchor (centred by default); its sides are multiples of 8. The new
area is the mask (True = generate) and gets an initial fill, since img2img starts from it:
- `edge`: each new pixel takes the nearest edge pixel's colour, then the new area is blurred so the
  streaks soften (like A1111's "fill": the image's colours, little structure);
- `reflect`: the image mirrored outward, then blurred (its shapes continue across the seam, softened);
- `mean`: the image's mean colour (like A1111's "latent nothing", a flat start).
The original's pixels are copied unchanged into the canvas (unless it was shrunk).

`render_size_for_ratio` picks the size to render a ratio at for SDXL: multiples of 64 near one
megapixel, the buckets SDXL was trained on (9:16 → 768x1344, 4:5 → 896x1152, 1.91:1 → 1344x704).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from app.conditioning.errors import ConditioningError

Fill = Literal["edge", "reflect", "mean"]

# Platform ratios by the names the post-processing presets use (width : height).
PLATFORM_RATIOS: dict[str, tuple[float, float]] = {
    "instagram_square": (1, 1),
    "instagram_portrait": (4, 5),
    "instagram_story": (9, 16),
    "tiktok": (9, 16),
    "linkedin": (1.91, 1),
    "facebook_feed": (1.91, 1),
    "x_post": (16, 9),
    "pinterest": (2, 3),
    "ecommerce_square": (1, 1),
    "web_hero": (16, 9),
}

# anchor name → where the original sits: (fraction of the free width left of it, of the free height above it)
ANCHORS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top": (0.5, 0.0),
    "bottom": (0.5, 1.0),
    "left": (0.0, 0.5),
    "right": (1.0, 0.5),
    "top-left": (0.0, 0.0),
    "top-right": (1.0, 0.0),
    "bottom-left": (0.0, 1.0),
    "bottom-right": (1.0, 1.0),
}

_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class OutpaintTarget:
    ratio: float | None = None  # width / height: the canvas is the smallest of this ratio holding the image
    width: int | None = None  # or an exact size (both set)
    height: int | None = None


def parse_target(value: str) -> OutpaintTarget:
    """`9:16`, `1.91:1`, `1080x1920` or a platform name (`instagram_story`) → a target."""
    if value in PLATFORM_RATIOS:
        w, h = PLATFORM_RATIOS[value]
        return OutpaintTarget(ratio=w / h)
    if m := _RATIO.match(value):
        w, h = float(m.group(1)), float(m.group(2))
        if w <= 0 or h <= 0 or not 0.1 <= w / h <= 10:
            raise ConditioningError("outpaint_target", f"ratio {value!r} must be positive and between 1:10 and 10:1")
        return OutpaintTarget(ratio=w / h)
    if m := _SIZE.match(value):
        width, height = int(m.group(1)), int(m.group(2))
        if width % 8 or height % 8 or min(width, height) < 64:
            raise ConditioningError(
                "outpaint_target", f"size {value!r}: width and height must be multiples of 8 and at least 64"
            )
        return OutpaintTarget(width=width, height=height)
    raise ConditioningError(
        "outpaint_target",
        f"{value!r} is neither a ratio (9:16), a size (1080x1920) nor a platform ({', '.join(PLATFORM_RATIOS)})",
    )


@dataclass(frozen=True, eq=False)
class OutpaintCanvas:
    pixels: np.ndarray = field(repr=False)  # [H, W, 3] uint8: the original placed, the new area filled
    generate: np.ndarray = field(repr=False)  # [H, W] bool: True over the new area
    box: tuple[int, int, int, int]  # where the original lies: x, y, width, height
    scale: float  # 1.0 unless the original was shrunk to fit an exact size
    fill: str

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def _ceil8(n: float) -> int:
    return 8 * math.ceil(n / 8 - 1e-9)


def canvas_size(width: int, height: int, target: OutpaintTarget) -> tuple[int, int, float]:
    """(canvas width, canvas height, scale of the original) for an image of width x height."""
    if target.width is not None and target.height is not None:
        scale = min(1.0, target.width / width, target.height / height)
        return target.width, target.height, scale
    if target.ratio is None:
        raise ConditioningError("outpaint_target", "a target needs a ratio or a width and height")
    if width / height < target.ratio:  # too narrow: add width
        return _ceil8(height * target.ratio), _ceil8(height), 1.0
    return _ceil8(width), _ceil8(width / target.ratio), 1.0


def outpaint_canvas(
    pixels: np.ndarray, target: OutpaintTarget, anchor: str | tuple[float, float] = "center", fill: Fill = "edge"
) -> OutpaintCanvas:
    """Place `pixels` [h, w, 3|4] on the target's canvas, with the mask of the new area and a fill."""
    rgb = np.ascontiguousarray(pixels[:, :, :3])  # [h, w, 3]
    h, w = rgb.shape[:2]
    cw, ch, scale = canvas_size(w, h, target)
    if scale < 1.0:
        w, h = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS))
    fx, fy = _anchor(anchor)
    x, y = round((cw - w) * fx), round((ch - h) * fy)
    generate = np.ones((ch, cw), dtype=bool)
    generate[y : y + h, x : x + w] = False
    if not generate.any():
        raise ConditioningError("outpaint_target", f"the image ({w}x{h}) already fills the {cw}x{ch} canvas")
    canvas = _filled(rgb, (cw, ch), (x, y), generate, fill)
    canvas[y : y + h, x : x + w] = rgb
    return OutpaintCanvas(pixels=canvas, generate=generate, box=(x, y, w, h), scale=scale, fill=fill)


def _anchor(anchor: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(anchor, str):
        if anchor not in ANCHORS:
            raise ConditioningError("outpaint_target", f"anchor {anchor!r} is not one of {', '.join(ANCHORS)}")
        return ANCHORS[anchor]
    fx, fy = anchor
    if not (0 <= fx <= 1 and 0 <= fy <= 1):
        raise ConditioningError("outpaint_target", f"anchor fractions must lie in [0, 1], got {anchor}")
    return fx, fy


def _filled(
    rgb: np.ndarray, size: tuple[int, int], at: tuple[int, int], generate: np.ndarray, fill: Fill
) -> np.ndarray:
    """[H, W, 3] uint8 canvas whose new area holds the fill (the original's area is overwritten later)."""
    (cw, ch), (x, y) = size, at
    h, w = rgb.shape[:2]
    if fill == "mean":
        mean = np.rint(rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        return np.broadcast_to(mean, (ch, cw, 3)).copy()
    if fill not in ("edge", "reflect"):
        raise ConditioningError("outpaint_target", f"fill {fill!r} is not one of edge, reflect, mean")
    pad = ((y, ch - h - y), (x, cw - w - x), (0, 0))
    extended = np.pad(rgb, pad, mode="edge" if fill == "edge" else "symmetric")  # [H, W, 3]
    # blur radius grows with the canvas so large new areas become soft colour fields
    radius = max(2.0, 0.02 * max(cw, ch))
    blurred = np.asarray(Image.fromarray(extended).filter(ImageFilter.GaussianBlur(radius)))
    return np.where(generate[:, :, None], blurred, extended)


def render_size_for_ratio(ratio: float, megapixels: float = 1.0, multiple: int = 64) -> tuple[int, int]:
    """(width, height), multiples of `multiple`, about `megapixels`·2²⁰ pixels, nearest to `ratio`
    (width / height): SDXL's buckets for the defaults. Sizes whose area lies within −10 %…+5 % of
    the goal are candidates; the closest ratio wins, then the closest area."""
    if not 0.1 <= ratio <= 10 or megapixels <= 0 or multiple < 8 or multiple % 8:
        raise ConditioningError(
            "outpaint_target",
            f"ratio {ratio} (0.1–10), megapixels {megapixels} (> 0), multiple {multiple} (a multiple of 8)",
        )
    area = megapixels * 2**20
    best: tuple[float, float, int, int] | None = None
    for height in range(multiple, int(math.sqrt(area * 10)) + 2 * multiple, multiple):
        for width in {
            multiple * max(1, math.floor(ratio * height / multiple)),
            multiple * math.ceil(ratio * height / multiple),
        }:
            closeness = abs(math.log(width * height / area))
            if not 0.9 <= width * height / area <= 1.05:
                continue
            key = (abs(math.log(width / height / ratio)), closeness, width, height)
            if best is None or key < best:
                best = key
    if best is None:  # tiny areas: the nearest multiple-of-`multiple` size of the ratio
        height = max(multiple, multiple * round(math.sqrt(area / ratio) / multiple))
        return max(multiple, multiple * round(ratio * height / multiple)), height
    return best[2], best[3]
