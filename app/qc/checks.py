"""Image-quality measurements: one plain function per check, no thresholds.

Every function here turns pixels into a number; `decision.py` turns numbers into a verdict.
All measurements work on the luminance plane `luma: [H, W] float32` in 0..255, built once by
`luminance()`, so a check costs one pass over an array that is already in memory.

Timing, median of 100 runs pinned to one AMD EPYC core (`taskset -c 0`, `OMP_NUM_THREADS=1`),
1024x1024 RGB uint8, numpy 2.4, scipy 1.17: `luminance` 1.0-1.6 ms, `sharpness` 5.6-6.3 ms (area
downscale to 512 px, then the Laplacian), `contrast` + `clipped_shares` + `mean_luma` 1.3 ms;
`check_image` end to end 6.7-7.7 ms (the same from a PIL image), 2.9 ms at 512x512.
`tests/test_qc_basic.py::test_check_image_is_fast` guards against regressions.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

# Below this side length a Laplacian is mostly border and the statistics mean nothing.
MIN_SIDE = 8

# Sharpness is measured after an area downscale to this longer side, so that a threshold means
# the same for a 512x512 and a 1024x1024 render. Doubling the resolution of the same scene
# spreads each edge over twice as many pixels, which divides the Laplacian's variance by
# roughly 4-16; measuring on a fixed pixel grid removes that. Smaller images are measured as
# they are: upscaling would only add interpolation blur that is not in the image.
SHARPNESS_WORKING_SIDE = 512

# Luma values counted as clipped. Generators rarely hit exactly 0 or 255, so allow 2 levels.
CLIP_DARK = 2.0
CLIP_BRIGHT = 253.0

# Rec. 601 luma weights, the same ones Pillow uses for convert("L").
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Formats a generator or the post-processing stage writes; anything else is not ours to judge.
DECODABLE_FORMATS = ("PNG", "JPEG", "WEBP")


def luminance(image: np.ndarray | Image.Image) -> np.ndarray:
    """Luma plane `[H, W] float32` in 0..255 of an RGB, grayscale or RGBA image.

    `image` is a PIL image or a uint8 array shaped `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or
    `[H, W, 4]`. Transparent pixels are composited over white, which is how a transparent
    render is shown on a page (and what the post-processing padding uses).
    """
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`image` must be a PIL image or a numpy array, but is a {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"`image` arrays must be uint8 (0..255), but the dtype is {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image.astype(np.float32)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"`image` must be shaped [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], but is {image.shape}"
        )

    # rgb: [H, W, 3] float32
    rgb = image[:, :, :3].astype(np.float32)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    return rgb @ _LUMA_WEIGHTS


def _pil_to_array(image: Image.Image) -> np.ndarray:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        return np.asarray(image.convert("RGBA"))
    if image.mode in ("L", "1"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def is_too_small(luma: np.ndarray) -> bool:
    """True when either side is under `MIN_SIDE` pixels (including empty images)."""
    return luma.shape[0] < MIN_SIDE or luma.shape[1] < MIN_SIDE


def sharpness(luma: np.ndarray, working_side: int = SHARPNESS_WORKING_SIDE) -> float:
    """Variance of the Laplacian of the luma, measured at `working_side` on the longer side.

    Larger is sharper. The value is in (grey levels)^2, like the usual OpenCV
    "variance of Laplacian" blur score, but comparable across resolutions (see
    `SHARPNESS_WORKING_SIDE`). It also scales with contrast squared, so a flat, low-contrast
    image reads as blurry too; `decision.py` reports those as "low_contrast" or "blank" first.
    """
    height, width = luma.shape
    longer = max(height, width)
    if longer > working_side:
        scale = working_side / longer
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # BOX is an area average: it removes the extra pixels without adding ringing (LANCZOS
        # would sharpen edges and inflate the score).
        luma = np.asarray(Image.fromarray(luma, mode="F").resize(size, Image.Resampling.BOX))
    return float(ndimage.laplace(luma).var())


def contrast(luma: np.ndarray) -> float:
    """RMS contrast: standard deviation of luma / 255, in 0..0.5."""
    return float(luma.std() / 255.0)


def mean_luma(luma: np.ndarray) -> float:
    """Mean luma / 255, in 0..1."""
    return float(luma.mean() / 255.0)


def clipped_shares(luma: np.ndarray) -> tuple[float, float]:
    """(share of pixels at or below `CLIP_DARK`, share at or above `CLIP_BRIGHT`), each 0..1."""
    size = luma.size
    dark = np.count_nonzero(luma <= CLIP_DARK) / size
    bright = np.count_nonzero(luma >= CLIP_BRIGHT) / size
    return float(dark), float(bright)


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG, JPEG or WebP bytes fully (a truncated file fails here, not later).

    Raises `ValueError` naming the problem for garbage, truncated or other-format bytes.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Pillow reports truncation as OSError, unknown formats as UnidentifiedImageError
        # (an OSError) and some corrupt headers as SyntaxError or ValueError.
        raise ValueError(f"cannot decode {len(data)} bytes as {'/'.join(DECODABLE_FORMATS)}: {e}") from e
    return image
