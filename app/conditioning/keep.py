"""Keeping the product: paste the original's kept pixels back over a generated image, and measure
how far an output's kept pixels are from the original's.

The blend band lies inside the kept region, along its border with the generated region: a kept
pixel at distance d ≤ band_px from the nearest generated pixel is a raised-cosine mix, with the
original's weight ½(1 − cos(π·d/(band_px+1))) (small next to the border, near 1 at the band's inner
edge); every kept pixel farther than band_px is the original's value, byte for byte. The band is on
the kept side because only there are both images meaningful: the original has no real content in
an outpainting canvas's new area or under a cutout's transparent background, while the generated
image renders the kept content again (a VAE round trip of it), so the mix does not show. To keep a
product's own outline exact, draw the kept region band_px wider than the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.conditioning.errors import ConditioningError
from app.conditioning.masks import distance_inside


def original_weight(keep_mask: np.ndarray, band_px: int) -> np.ndarray:
    """[H, W] float64 in [0, 1]: the original's share of each output pixel (0 where generated)."""
    if band_px < 0:
        raise ValueError(f"band_px must be ≥ 0, got {band_px}")
    distance = distance_inside(keep_mask)  # [H, W], 0 where generated
    weight = np.where(keep_mask, 1.0, 0.0)
    band = keep_mask & (distance <= band_px)
    weight[band] = 0.5 * (1.0 - np.cos(np.pi * distance[band] / (band_px + 1)))
    return weight


def paste_back(generated: np.ndarray, original: np.ndarray, keep_mask: np.ndarray, band_px: int = 4) -> np.ndarray:
    """[H, W, C] uint8: `generated` with the kept region replaced by `original` (C from `generated`;
    an RGBA original contributes its RGB), feathered over `band_px` pixels inside the kept region."""
    _check_shapes(generated, original, keep_mask)
    channels = generated.shape[2]
    weight = original_weight(keep_mask, band_px)[:, :, None]  # [H, W, 1]
    mixed = weight * original[:, :, :channels] + (1.0 - weight) * generated
    output = np.rint(mixed).astype(np.uint8)
    exact = (weight == 1.0)[:, :, 0]
    output[exact] = original[:, :, :channels][exact]  # bytes, not a float round trip
    return output


@dataclass(frozen=True)
class KeptDifference:
    mean_abs: float  # 0–255, over the measured pixels and channels
    mean_abs_unit: float  # mean_abs / 255
    max_abs: int  # 0–255
    pixels: int  # kept pixels measured (outside the band)


def kept_region_difference(
    output: np.ndarray, original: np.ndarray, keep_mask: np.ndarray, band_px: int = 4
) -> KeptDifference:
    """How far `output` is from `original` over the kept pixels farther than `band_px` from the
    generated region, on the RGB channels. 0 for anything `paste_back` made with that band."""
    _check_shapes(output, original, keep_mask)
    measured = keep_mask & (distance_inside(keep_mask) > band_px)  # [H, W]
    count = int(measured.sum())
    if count == 0:
        raise ConditioningError(
            "mask_band", f"no kept pixel lies farther than band_px={band_px} from the generated region"
        )
    diff = np.abs(output[:, :, :3][measured].astype(np.int16) - original[:, :, :3][measured].astype(np.int16))
    mean = float(diff.mean())
    return KeptDifference(mean_abs=mean, mean_abs_unit=mean / 255.0, max_abs=int(diff.max()), pixels=count)


def _check_shapes(image: np.ndarray, original: np.ndarray, keep_mask: np.ndarray) -> None:
    if image.ndim != 3 or original.ndim != 3:
        raise ValueError(f"images must be [H, W, C], got {image.shape} and {original.shape}")
    if image.shape[:2] != original.shape[:2] or keep_mask.shape != image.shape[:2]:
        raise ConditioningError(
            "mask_size",
            f"generated {image.shape[1]}x{image.shape[0]}, original {original.shape[1]}x{original.shape[0]} "
            f"and keep mask {keep_mask.shape[1]}x{keep_mask.shape[0]} must be one size",
        )
    if original.shape[2] < image.shape[2]:
        raise ValueError(f"original has {original.shape[2]} channels, fewer than the image's {image.shape[2]}")
    if keep_mask.dtype != np.bool_:
        raise ValueError(f"keep_mask must be a bool array, got {keep_mask.dtype}")
