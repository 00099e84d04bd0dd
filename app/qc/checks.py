"""Image-quality measurements: one plain function per check, no thresholds.

Every function here turns pixels into a number; `decision.py` turns numbers into a verdict.
The pixel checks work on the luminance plane `luma: [H, W] float32` in 0..255, built once by
`luminance()`, so a check costs one pass over an array that is already in memory; the artefact
checks add the RGB image and a 64-cell grid of it (`cell_grid`).

Timing, median of 100 runs pinned to one AMD EPYC core (`taskset -c 0`, `OMP_NUM_THREADS=1`),
1024x1024 RGB uint8, numpy 2.4, scipy 1.17: `luminance` 1.0-1.6 ms, `sharpness` 5.6-6.3 ms (area
downscale to 512 px, then the Laplacian), `contrast` + `clipped_shares` + `mean_luma` 1.3 ms;
`check_image` end to end 6.7-7.7 ms (the same from a PIL image), 2.9 ms at 512x512.
`tests/test_qc_basic.py::test_check_image_is_fast` guards against regressions.
Artefacts (`artefact_scores`, same setup, `python -m benchmarks.qc_speed`): cell grid 1.0 ms,
colour cast 0.2 ms, black/green blocks 2.3 ms, blockiness 0.7 ms, banding 4.6 ms; 9.4 ms in all.
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

# A plain light backdrop (the white of a packshot, a light studio sweep): flat cells (luma std under
# `FLAT_CELL_STD`) at least this light, connected to the frame's edge, covering at least
# `BACKDROP_BORDER_SHARE` of the edge's cells. A product stands inside its backdrop, so the backdrop
# runs all round the frame; a blown-out sky or wall touches one to three sides and stays part of
# the picture (and of its overexposure). A soft shadow is darker than this and stays in the subject.
BACKDROP_LUMA = 235.0
BACKDROP_BORDER_SHARE = 0.9
# Below this share of the frame, what is not backdrop is too little to measure on its own: the
# whole frame is measured (a white page is blank and overexposed, not a tiny subject).
MIN_SUBJECT_SHARE = 0.005

_LEVEL_TOLERANCE = 1e-3

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
    image = _as_array(image)
    if image.ndim == 2:
        return image.astype(np.float32)

    # rgb: [H, W, 3] float32
    rgb = image[:, :, :3].astype(np.float32)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    return rgb @ _LUMA_WEIGHTS


def rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """The image as RGB uint8 `[H, W, 3]`: grayscale repeated, alpha composited over white.

    Accepts what `luminance` accepts; an RGB uint8 array comes back as it is (no copy).
    """
    image = _as_array(image)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 3:
        return image
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    composited = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(composited).astype(np.uint8)


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A validated uint8 array shaped `[H, W]`, `[H, W, 3]` or `[H, W, 4]`."""
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"`image` must be a PIL image or a numpy array, but is a {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"`image` arrays must be uint8 (0..255), but the dtype is {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2 and (image.ndim != 3 or image.shape[2] not in (3, 4)):
        raise ValueError(f"`image` must be shaped [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], but is {image.shape}")
    return image


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


def sharpness(luma: np.ndarray, working_side: int = SHARPNESS_WORKING_SIDE, subject: np.ndarray | None = None) -> float:
    """Variance of the Laplacian of the luma, measured at `working_side` on the longer side.

    Larger is sharper. The value is in (grey levels)^2, like the usual OpenCV
    "variance of Laplacian" blur score, but comparable across resolutions (see
    `SHARPNESS_WORKING_SIDE`). It also scales with contrast squared, so a flat, low-contrast
    image reads as blurry too; `decision.py` reports those as "low_contrast" or "blank" first.

    `subject` (`[H, W]` bool, from `subject_mask`) limits the variance to those pixels: a plain
    backdrop has a Laplacian of zero by construction, and averaging it in would make a sharp
    product that fills a third of the frame read as a third as sharp.
    """
    height, width = luma.shape
    longer = max(height, width)
    if longer > working_side:
        scale = working_side / longer
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        # BOX is an area average: it removes the extra pixels without adding ringing (LANCZOS
        # would sharpen edges and inflate the score).
        luma = np.asarray(Image.fromarray(luma, mode="F").resize(size, Image.Resampling.BOX))
        if subject is not None:
            subject = np.asarray(Image.fromarray(subject).resize(size, Image.Resampling.NEAREST))
    laplacian = ndimage.laplace(luma)
    return float(laplacian.var() if subject is None else laplacian[subject].var())


def contrast(luma: np.ndarray, subject: np.ndarray | None = None) -> float:
    """RMS contrast: standard deviation of luma / 255, in 0..0.5; over `subject` pixels if given
    (a white product on white has its contrast in the product, not in the backdrop)."""
    return float((luma if subject is None else luma[subject]).std() / 255.0)


def mean_luma(luma: np.ndarray) -> float:
    """Mean luma / 255, in 0..1."""
    return float(luma.mean() / 255.0)


def clipped_shares(luma: np.ndarray, subject: np.ndarray | None = None) -> tuple[float, float]:
    """(share of pixels at or below `CLIP_DARK`, share at or above `CLIP_BRIGHT`), each 0..1.

    With `subject`, shares of the subject's pixels: a backdrop of pure white is clipped by design
    and holds no detail to lose, while clipped highlights on the product itself are lost detail.
    """
    if subject is not None:
        luma = luma[subject]
    size = max(1, luma.size)
    # The float32 luma weights sum to a hair under 1, so a grey RGB pixel of 253 reads 252.99998:
    # compare with a thousandth of a level to spare, or an RGB copy of a greyscale image would
    # clip less than the greyscale image itself.
    dark = np.count_nonzero(luma <= CLIP_DARK + _LEVEL_TOLERANCE) / size
    bright = np.count_nonzero(luma >= CLIP_BRIGHT - _LEVEL_TOLERANCE) / size
    return float(dark), float(bright)


def subject_mask(luma: np.ndarray) -> np.ndarray | None:
    """The pixels that are not a plain light backdrop (`[H, W]` bool), or None when the frame has
    no such backdrop (or too little else to measure): then the whole frame is the subject.

    Works on the `ARTEFACT_GRID` cell grid (one 16 x 16 px cell per 1024 px / 64): a cell is
    backdrop when it is flat and light (`BACKDROP_LUMA`) and connected through such cells to the
    frame's edge, and only when those cells cover `BACKDROP_BORDER_SHARE` of the edge. Cells that
    hold the product's outline are not flat, so the outline (part of the product's sharpness)
    stays in the subject.
    """
    # Most images have no backdrop: their frame edge is not light, which costs only the edge to see.
    frame_edge = np.concatenate([luma[0], luma[-1], luma[1:-1, 0], luma[1:-1, -1]])
    if np.count_nonzero(frame_edge >= BACKDROP_LUMA) < BACKDROP_BORDER_SHARE * frame_edge.size:
        return None
    # mean, mean_sq: [h, w]; std per cell from E[x^2] - E[x]^2
    mean = cell_grid(luma)
    std = np.sqrt(np.maximum(cell_grid(luma * luma) - mean * mean, 0.0))
    light_flat = (std < FLAT_CELL_STD) & (mean >= BACKDROP_LUMA)
    labels, _ = ndimage.label(light_flat)
    edge = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    if np.count_nonzero(edge) < BACKDROP_BORDER_SHARE * edge.size:
        return None
    backdrop = np.isin(labels, np.unique(edge[edge > 0]))
    if 1.0 - backdrop.mean() < MIN_SUBJECT_SHARE:
        return None
    # back to pixels: cell (y // factor, x // factor), as `cell_grid` averaged them
    factor = max(1, max(luma.shape) // ARTEFACT_GRID)
    rows = np.minimum(np.arange(luma.shape[0]) // factor, backdrop.shape[0] - 1)
    cols = np.minimum(np.arange(luma.shape[1]) // factor, backdrop.shape[1] - 1)
    # The cells along the product's outline hold backdrop pixels too: their light pixels are
    # backdrop (else a thin product's outline would read as clipped highlights).
    outline = ndimage.binary_dilation(backdrop) & ~backdrop
    subject = ~backdrop[rows[:, None], cols[None, :]]
    subject &= ~(outline[rows[:, None], cols[None, :]] & (luma >= BACKDROP_LUMA))
    return subject


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


# --- artefacts ------------------------------------------------------------------------------------
#
# Values below were measured on scikit-image's photographs at 512 and 1024 px (see
# `benchmarks/qc_eval.py`); they define what each measurement means, `decision.py` holds the
# thresholds.

# Block and cast checks work on a grid of cells this many on the longer side: a 1024 px image
# becomes 64 x 64 cells of 16 x 16 px, enough to tell "a block over 10% of the frame" and cheap
# (PIL's BOX filter, in C).
ARTEFACT_GRID = 64

# A cell is flat when its luma varies by less than this (std, grey levels): generator grain on a
# failed region stays under it, real shadows and skies have more texture (the darkest real photos
# measured keep under 6% of their cells flat and dark).
FLAT_CELL_STD = 4.0
# Flat cells this dark (mean luma) are "black"; a failed VAE decode or a safety-filter fill is ~0.
BLACK_CELL_LUMA = 20.0
# Flat cells whose green exceeds both red and blue by this much are "green": an all-zero YUV frame
# decodes to RGB (0, 135, 0), a chroma-key screen to about (0, 177, 64).
GREEN_CELL_MARGIN = 60.0

# Colour cast is read from two places a cast cannot miss and a subject's own colour rarely
# reaches: the brightest cells (whites and highlights are near-neutral in a balanced photo) and the
# most neutral cells (the greys, whites and metal of the scene). A cast tints both; a scene that
# is mostly one natural colour (a red bike, green foliage, a blue sky) tints its highlights when the
# coloured surface is the brightest thing in it, but leaves its neutral surfaces neutral.
CAST_HIGHLIGHT_SHARE = 0.05
# The most neutral cells: this share of the cells with CIELab lightness of at least
# `CAST_NEUTRAL_MIN_LIGHTNESS` (darker cells are near-neutral whatever the cast, and noisy).
CAST_NEUTRAL_SHARE = 0.1
CAST_NEUTRAL_MIN_LIGHTNESS = 30.0
# A cast of strength c moves the most neutral cells by about c/3 or more: the cells a cast leaves
# most neutral are those of the complementary colour it cancels (a blue gain greys a warm skin).
# Measured on the photographs under 30% gains and 40% tints: the neutral chroma was 0.3-1.0 of the
# highlights' (one 0.27), on the balanced scenes with a dominant colour 0.01-0.3.
CAST_NEUTRAL_FACTOR = 3.0

# JPEG and VAE blocks sit on an 8 px grid.
BLOCK_PERIOD = 8
# Within-block differences below one grey level are flatness, not a baseline to divide by.
BLOCK_DIFF_FLOOR = 1.0

# Banding is looked for where the image is smooth (both neighbour differences at most this, in
# grey levels), in the tones present there.
BANDING_SMOOTH_DIFF = 2.5
# Tone steps up to this are banding; larger ones are edges between distinct flat areas.
BANDING_MAX_STEP = 32
# Fewer evenly stepped plateaus than this are a few flat tones (illustration), not banding.
BANDING_MIN_STEPS = 5
# Banding is measured on about this many pixels on the longer side (a strided sample).
BANDING_WORKING_SIDE = 512

# sRGB (D65) to XYZ, rows X, Y, Z, and the D65 white point.
_SRGB_TO_XYZ = np.array(
    [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], dtype=np.float64
)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def cell_grid(plane: np.ndarray, grid: int = ARTEFACT_GRID) -> np.ndarray:
    """Area average of `plane` (`[H, W]` float32 or `[H, W, 3]` uint8) over square cells of
    `longer side // grid` pixels: float32 `[h, w]` or `[h, w, 3]`, `grid` to `2 * grid - 1` cells on
    the longer side. Images under `grid` pixels are returned as they are (one pixel per cell).
    """
    factor = max(1, max(plane.shape[:2]) // grid)
    if plane.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    else:
        image = Image.fromarray(plane)
    if factor > 1:
        # Image.reduce: an exact box average over factor x factor blocks, in C, ~3x faster than
        # resize(BOX) (a partial last row/column of cells is averaged over what it has).
        image = image.reduce(factor)
    return np.asarray(image, dtype=np.float32)


def srgb_to_lab(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CIELab (L, a, b) of sRGB values `[..., 3]` in 0..255 (D65)."""
    c = rgb.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return 116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])


def color_cast(cells_rgb: np.ndarray) -> float:
    """How strongly the whole image is tinted: CIELab chroma (0..~130), 0 for a grey image.

    `cells_rgb` is `cell_grid(rgb)`: `[h, w, 3]`. The smaller of two readings (see
    `CAST_NEUTRAL_FACTOR`): the chroma of the mean colour of the brightest 5% of cells, and
    `CAST_NEUTRAL_FACTOR` times the chroma of the mean colour of the 10% least chromatic cells
    (grey-world on the near-neutral surfaces). A tint that only the highlights carry, while the
    scene's neutral surfaces stay neutral, is the colour of the subject, not of the light.
    Correctly balanced photos measured 0..15; dominant-colour scenes (a red motorcycle, an orange
    suit, a green one) 1..13 (the highlights alone: up to 80); the photos under a 30% channel gain
    or a 40% colour tint 7..75, most above 20. An image with no neutral surface at all, one hue
    edge to edge, cannot be told from a cast and reads as one.
    """
    lightness, a, b = srgb_to_lab(cells_rgb.reshape(-1, 3))
    count = max(1, round(CAST_HIGHLIGHT_SHARE * lightness.size))
    brightest = np.argpartition(lightness, lightness.size - count)[-count:]
    highlights = float(np.hypot(a[brightest].mean(), b[brightest].mean()))
    lit = lightness >= CAST_NEUTRAL_MIN_LIGHTNESS
    if not lit.any():
        return highlights
    a_lit, b_lit = a[lit], b[lit]
    count = max(1, round(CAST_NEUTRAL_SHARE * a_lit.size))
    most_neutral = np.argpartition(np.hypot(a_lit, b_lit), count - 1)[:count]
    neutrals = float(np.hypot(a_lit[most_neutral].mean(), b_lit[most_neutral].mean()))
    return min(highlights, CAST_NEUTRAL_FACTOR * neutrals)


def flat_block_shares(luma: np.ndarray, cells_rgb: np.ndarray) -> tuple[float, float]:
    """(black, green): the share of the frame covered by the largest rectangle of flat black
    cells, and of flat green cells, each 0..1. `cells_rgb` is `cell_grid(rgb)`.

    A rectangle, not any connected region: a failed tile or a fill is a rectangle, while a dark
    background or a smoothed night sky wraps around the subject (connected regions of those
    measured up to 0.24 on the photos; their rectangles stay small). A block that touches a dark
    area of the photo is still found, which a "region that fills its bounding box" rule misses.
    Border cells that a block only partly covers are not flat, so a pasted block reads a few
    percent under its true area (30% reads about 0.28 on a 1024 px image).
    """
    # luma_cells, luma_sq_cells: [h, w]; std from E[x^2] - E[x]^2 per cell
    luma_cells = cell_grid(luma)
    luma_sq_cells = cell_grid(luma * luma)
    std = np.sqrt(np.maximum(luma_sq_cells - luma_cells * luma_cells, 0.0))
    flat = std < FLAT_CELL_STD
    black = flat & (luma_cells < BLACK_CELL_LUMA)
    red, green, blue = cells_rgb[..., 0], cells_rgb[..., 1], cells_rgb[..., 2]
    greenish = flat & (green - np.maximum(red, blue) > GREEN_CELL_MARGIN)
    return _largest_block_share(black), _largest_block_share(greenish)


def _largest_block_share(mask: np.ndarray) -> float:
    """Share of the grid under the largest axis-aligned rectangle of True cells."""
    height, width = mask.shape
    columns = np.arange(width)
    best = 0
    for top in np.flatnonzero(mask.any(axis=1)):
        # solid: [H - top, W], cell (k, x) True when column x is True in every row top..top+k
        solid = np.logical_and.accumulate(mask[top:], axis=0)
        # longest run of True ending at each x: x minus the last False at or before it
        last_false = np.maximum.accumulate(np.where(solid, -1, columns), axis=1)
        runs = columns - last_false  # [H - top, W]
        rows = np.arange(1, height - top + 1)[:, None]
        best = max(best, int((runs.max(axis=1, keepdims=True) * rows).max()))
    return float(best / mask.size)


def blockiness(luma: np.ndarray) -> float:
    """How much stronger luma steps are on one phase of an 8 px grid than elsewhere.

    Mean absolute neighbour difference per column, its median per phase (x mod 8), strongest
    phase over the median phase (floored at one grey level), horizontally and vertically; the
    smaller of the two, since real blocks show both ways and stripes only one. Offset-free: the
    grid may start anywhere.
    1.0-1.2 for real photos, 1.17-1.5 after JPEG quality 70, 1.9-3.8 after quality 10.
    """
    height, width = luma.shape
    if min(height, width) < 2 * BLOCK_PERIOD:
        return 1.0
    # every second row / column: half the work, the same profile
    across = np.abs(np.diff(luma[::2], axis=1)).mean(axis=0)  # [W-1]
    down = np.abs(np.diff(luma[:, ::2], axis=0)).mean(axis=1)  # [H-1]
    return float(min(_phase_ratio(across), _phase_ratio(down)))


def _phase_ratio(profile: np.ndarray) -> float:
    usable = len(profile) // BLOCK_PERIOD * BLOCK_PERIOD
    # median over the columns of each phase: one strong edge (a pasted rectangle, a horizon)
    # sits in one column only, a block grid in every column of its phase
    by_phase = np.median(profile[:usable].reshape(-1, BLOCK_PERIOD), axis=0)  # [8]
    return float(by_phase.max() / max(float(np.median(by_phase)), BLOCK_DIFF_FLOOR))


def banding(rgb: np.ndarray, luma: np.ndarray) -> float:
    """Share of missing tones between the evenly stepped tones of the smooth areas, 0..1.

    In smooth areas a gradient uses every level; a banded (posterised) one jumps between plateaus
    2-32 levels apart. Per channel: the levels present in smooth pixels (ignoring stray ones),
    the gaps between consecutive levels up to `BANDING_MAX_STEP`, and sum(gap - 1) / sum(gap);
    the median of the three channels. 0 with fewer than `BANDING_MIN_STEPS` such steps.
    Real photos measured 0..0.32; posterised to 6 bits 0.75, to 4 bits 0.94. JPEG fills the gaps
    in, so it is meant for the generator's own output, not for re-encoded files.
    """
    stride = max(1, round(max(luma.shape) / BANDING_WORKING_SIDE))
    sample = luma[::stride, ::stride]
    across = np.abs(np.diff(sample, axis=1))[:-1]
    down = np.abs(np.diff(sample, axis=0))[:, :-1]
    smooth = (across <= BANDING_SMOOTH_DIFF) & (down <= BANDING_SMOOTH_DIFF)  # [h-1, w-1]
    if np.count_nonzero(smooth) < 1000:
        return 0.0
    # a contiguous copy first: boolean indexing a strided 3-channel view is 4x slower
    sample_rgb = np.ascontiguousarray(rgb[::stride, ::stride][:-1, :-1])  # [h-1, w-1, 3]
    pixels = sample_rgb[smooth]  # [n, 3] uint8
    return float(np.median([_tone_gap_share(pixels[:, c]) for c in range(3)]))


def _tone_gap_share(values: np.ndarray) -> float:
    counts = np.bincount(values, minlength=256)
    present = np.flatnonzero(counts)
    span = present[-1] - present[0] + 1
    # a level counts when it holds at least a tenth of an even share: JPEG-like strays do not
    levels = np.flatnonzero(counts >= 0.1 * values.size / span)
    steps = np.diff(levels)
    steps = steps[steps <= BANDING_MAX_STEP]
    if np.count_nonzero(steps >= 2) < BANDING_MIN_STEPS:
        return 0.0
    return float((steps - 1).sum() / steps.sum())


def artefact_scores(rgb: np.ndarray, luma: np.ndarray) -> dict[str, float]:
    """All artefact measures of one image: `rgb` `[H, W, 3]` uint8 and its `luma`."""
    cells_rgb = cell_grid(rgb)
    black, green = flat_block_shares(luma, cells_rgb)
    return {
        "color_cast": color_cast(cells_rgb),
        "black_block": black,
        "green_block": green,
        "blockiness": blockiness(luma),
        "banding": banding(rgb, luma),
    }
