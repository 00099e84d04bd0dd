"""Seam measures for QC: is there a visible edge where generated pixels meet kept ones?

`edge_contrast` compares the mean luminance-gradient magnitude on a set of border pixels with the
mean on reference pixels nearby; `seam_score` applies it to the ring along a keep mask's border
(both sides, `ring_px` deep) against the pixels `ring_px`…`ring_px + context_px` from it.
About 1 means the border is as busy as its surroundings; a pasted edge pushes it up.

Calibrated on real photographs (tests/test_images_keep.py: scikit-image's astronaut, coffee,
chelsea and rocket, 512 px on the longer side, cropped to 448x336; a disc of radius 110 px of one photo kept over each other photo;
ring 2 px, context 12 px):
- a naive paste (hard edge between two photos): 2.38–5.73 over the 12 pairs;
- the same pairs through `paste_back` with an 8-px band: 0.63–1.30;
- no seam at all (the kept photo alone, measured along the same ring): 0.85–1.11.
`SEAM_SCORE_LIMIT` = 1.8 (about the geometric middle of 1.30 and 2.38) separates the two. A kept
region whose border follows a real outline (a product's silhouette) is busy there by nature, so QC
should compare with the input's own score along the same ring (`seam_score(original, keep_mask)`),
not only with the limit.
"""

from __future__ import annotations

import numpy as np

from app.conditioning.masks import distance_inside

SEAM_SCORE_LIMIT = 1.8


def gradient_magnitude(pixels: np.ndarray) -> np.ndarray:
    """[H, W] float: |∇ luminance| by central differences (one-sided at the image's edges)."""
    rgb = pixels[:, :, :3].astype(np.float64)
    luminance = rgb @ np.array([0.299, 0.587, 0.114])  # [H, W]
    gy, gx = np.gradient(luminance)
    return np.hypot(gx, gy)


def edge_contrast(pixels: np.ndarray, border: np.ndarray, reference: np.ndarray) -> float:
    """Mean gradient magnitude over `border` pixels / mean over `reference` pixels (bool [H, W])."""
    if not border.any() or not reference.any():
        raise ValueError(f"border ({int(border.sum())} px) and reference ({int(reference.sum())} px) must be non-empty")
    gradient = gradient_magnitude(pixels)
    return float(gradient[border].mean() / max(gradient[reference].mean(), 1e-6))


def seam_score(pixels: np.ndarray, keep_mask: np.ndarray, ring_px: int = 2, context_px: int = 12) -> float:
    """`edge_contrast` of the ring along the keep mask's border against the pixels just beyond it."""
    if keep_mask.shape != pixels.shape[:2]:
        raise ValueError(f"keep mask is {keep_mask.shape[::-1]}, image is {pixels.shape[1::-1]}")
    distance = np.maximum(distance_inside(keep_mask), distance_inside(~keep_mask))  # [H, W], ≥ 1
    border = distance <= ring_px
    reference = (distance > ring_px) & (distance <= ring_px + context_px)
    return edge_contrast(pixels, border, reference)
