"""Keeping the product: paste-back is exact outside its band, the band is as wide as asked, and the
kept-region difference and the seam score measure what they claim on real photographs."""

from __future__ import annotations

import numpy as np
import pytest
from photos import photo
from PIL import Image

from app.conditioning import (
    ConditioningError,
    kept_region_difference,
    load_input_image,
    mask_from_alpha,
    paste_back,
    seam_score,
)
from app.conditioning.keep import original_weight
from app.conditioning.masks import distance_inside
from app.conditioning.seams import SEAM_SCORE_LIMIT

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
H, W = 336, 448  # every photo at 512 px is at least this large


def scene(name: str) -> np.ndarray:
    return np.ascontiguousarray(photo(name, 512)[:H, :W])  # [H, W, 3]


def disc(radius: float = 110) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - H / 2) ** 2 + (xx - W / 2) ** 2 < radius**2  # [H, W] bool, True = keep


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("band_px", [0, 3, 8])
def test_kept_pixels_outside_the_band_are_exact(name, band_px):
    original, generated, keep = scene(name), random_image(band_px), disc()
    output = paste_back(generated, original, keep, band_px)
    difference = kept_region_difference(output, original, keep, band_px)
    assert (difference.mean_abs, difference.mean_abs_unit, difference.max_abs) == (0.0, 0.0, 0)
    assert difference.pixels == int((keep & (distance_inside(keep) > band_px)).sum()) > 30_000
    assert np.array_equal(output[~keep], generated[~keep])  # the generated region is the model's


@pytest.mark.parametrize("band_px", [1, 4, 8, 16])
def test_the_band_is_as_wide_as_configured(band_px):
    original, generated, keep = scene("coffee"), random_image(1), disc()
    output = paste_back(generated, original, keep, band_px)
    distance = distance_inside(keep)
    band = keep & (distance <= band_px)
    # every band pixel is a true mix: where the images differ enough that rounding cannot hide
    # either share, the output equals neither
    weight = original_weight(keep, band_px)
    assert ((weight[band] > 0) & (weight[band] < 1)).all()
    share = np.minimum(weight, 1 - weight)[:, :, None]  # [H, W, 1]
    gap = np.abs(original.astype(int) - generated.astype(int))  # [H, W, 3]
    visible = band[:, :, None] & (gap * share > 0.51)
    mixed = (output != original) & (output != generated)
    assert visible.sum() > 1000 and mixed[visible].all()
    # the band reaches band_px deep, no further; its weights rise with depth
    assert distance[band].max() > band_px - 1 and np.array_equal(output[keep & ~band], original[keep & ~band])
    row = weight[H // 2]
    inner = row[(row > 0) & (row < 1)]
    assert len(inner) == 2 * band_px  # band_px pixels on each side of the disc along its middle row
    assert (np.diff(inner[:band_px]) > 0).all()


def test_kept_difference_sees_what_changed_and_ignores_the_band():
    original, keep = scene("chelsea"), disc()
    altered = original.copy()
    altered[H // 2, W // 2] = original[H // 2, W // 2] ^ 0x40  # one kept pixel changed by 64 in each channel
    difference = kept_region_difference(altered, original, keep, 4)
    assert difference.max_abs == 64 and difference.mean_abs == pytest.approx(64 / difference.pixels)
    assert difference.mean_abs_unit == pytest.approx(difference.mean_abs / 255)
    # an A1111-style composite (seam centred on the border) changes kept pixels inside its band only
    soft = paste_back(random_image(2), original, disc(110 + 4), band_px=8)  # band 8 px deep from r=114
    assert kept_region_difference(soft, original, keep, 0).max_abs > 0  # r ≤ 110 reaches into that band
    assert kept_region_difference(soft, original, disc(106 - 1), 0).max_abs == 0


def test_sizes_must_agree_and_the_band_must_leave_kept_pixels():
    original, keep = scene("rocket"), disc()
    with pytest.raises(ConditioningError, match="generated 448x335, original 448x336 and keep mask 448x336"):
        paste_back(random_image(0)[:-1], original, keep)
    thin = np.zeros((H, W), bool)
    thin[100:104, 100:300] = True  # 4 px thick: nothing is farther than 2 px from its border
    with pytest.raises(ConditioningError, match="mask_band: no kept pixel lies farther than band_px=4"):
        kept_region_difference(original, original, thin, 4)


def test_rgba_original_contributes_its_rgb():
    original = np.dstack([scene("astronaut"), np.full((H, W), 255, np.uint8)])
    output = paste_back(random_image(3), original, disc(), 4)
    assert output.shape == (H, W, 3)
    assert kept_region_difference(output, original, disc(), 4).max_abs == 0


def seam_scores() -> dict[str, list[float]]:
    """Seam scores along a disc's border: a naive paste of one photo over another, the same pair
    through paste_back (8-px band), and the kept photo alone (no seam at all)."""
    keep = disc()
    scores: dict[str, list[float]] = {"naive": [], "feathered": [], "none": []}
    for kept in PHOTOS:
        scores["none"].append(seam_score(scene(kept), keep))
        for other in PHOTOS:
            if other != kept:
                scores["naive"].append(seam_score(np.where(keep[:, :, None], scene(kept), scene(other)), keep))
                scores["feathered"].append(seam_score(paste_back(scene(other), scene(kept), keep, 8), keep))
    return scores


def test_seam_score_separates_a_naive_paste_from_a_feathered_one():
    scores = seam_scores()
    # the calibration in app/conditioning/seams.py's docstring
    assert min(scores["naive"]) > 2.3 and max(scores["naive"]) < 5.8
    assert min(scores["feathered"]) > 0.6 and max(scores["feathered"]) < 1.35
    assert min(scores["none"]) > 0.8 and max(scores["none"]) < 1.15
    assert max(scores["feathered"]) < SEAM_SCORE_LIMIT < min(scores["naive"])


def test_a_product_cutout_stays_exact_from_file_to_output(tmp_path):
    """The inpainting path the generator will take: a PNG cutout on disk, its alpha as the mask,
    a generated background, the product pasted back."""
    cutout = np.dstack([scene("coffee"), np.where(disc(), 255, 0).astype(np.uint8)])  # [H, W, 4]
    Image.fromarray(cutout).save(tmp_path / "cup.png")
    product = load_input_image("cup.png", base_dir=tmp_path)
    keep = ~mask_from_alpha(product)
    assert np.array_equal(keep, disc())
    output = paste_back(scene("chelsea"), product.pixels, keep, band_px=6)
    assert kept_region_difference(output, product.pixels, keep, 6).max_abs == 0
    assert seam_score(output, keep) < SEAM_SCORE_LIMIT
