"""Upscaling tiles: Lanczos resize, tile plans that cover the image, feathered blending without seams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from photos import photo
from PIL import Image

from app.conditioning import ConditioningError, blend_tiles, cut_tiles, plan_tiles, upscale
from app.conditioning.tiles import tile_seam_score, upscaled_size

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def test_upscale_is_lanczos_to_multiples_of_8():
    pixels = photo("coffee", 300)  # [200, 300, 3]
    assert upscaled_size(300, 200, 1.5) == (448, 304)  # 450 → 448, 300 → 304
    big = upscale(pixels, 1.5)
    assert big.shape == (304, 448, 3)
    assert np.array_equal(big, np.asarray(Image.fromarray(pixels).resize((448, 304), Image.Resampling.LANCZOS)))
    for scale in (0.5, 9):
        with pytest.raises(ConditioningError, match=f"upscale_settings: scale must be between 1 and 8, got {scale}"):
            upscale(pixels, scale)


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"),
    [
        (2048, 1536, 1024, 128),
        (1000, 1000, 512, 64),
        (520, 1040, 512, 64),
        (1024, 1024, 1024, 128),
        (256, 128, 512, 64),
    ],
)
def test_plan_covers_the_image_with_overlapping_tiles_in_multiples_of_8(width, height, tile, overlap):
    plan = plan_tiles(width, height, tile, overlap)
    covered = np.zeros((height, width), int)
    for t in plan.tiles:
        assert t.x % 8 == 0 and t.y % 8 == 0 and t.width % 8 == 0 and t.height % 8 == 0
        assert t.x >= 0 and t.x + t.width <= width and t.y >= 0 and t.y + t.height <= height
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
    assert covered.min() >= 1  # every pixel, edges included
    for starts, size, length in ((plan.xs, plan.tile_width, width), (plan.ys, plan.tile_height, height)):
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(a + size - b >= overlap for a, b in itertools.pairwise(starts))  # neighbours overlap enough
    assert (plan.tile_width, plan.tile_height) == (min(tile, width), min(tile, height))


def test_plan_counts_for_sdxl_sizes():
    plan = plan_tiles(2048, 2048, 1024, 128)  # a 1024² image upscaled ×2
    assert plan.xs == plan.ys == (0, 512, 1024) and len(plan.tiles) == 9
    assert plan_tiles(1024, 1024, 1024, 128).xs == (0,)


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "message"),
    [
        ((1001, 1000), 256, 64, "image size 1001x1000 must be multiples of 8 to tile"),
        ((1024, 1024), 100, 16, "tile size must be a multiple of 8 and at least 64, got 100"),
        ((1024, 1024), 256, 136, "overlap must be a multiple of 8 between 0 and tile/2=128, got 136"),
    ],
)
def test_bad_tile_settings_are_named(size, tile, overlap, message):
    with pytest.raises(ConditioningError, match=message):
        plan_tiles(*size, tile, overlap)


@pytest.mark.parametrize("name", PHOTOS)
def test_blending_identical_tiles_reproduces_the_image_exactly(name):
    big = upscale(photo(name, 384), 2.0)
    for tile, overlap in ((256, 64), (192, 96), (512, 0)):
        plan = plan_tiles(big.shape[1], big.shape[0], tile, overlap)
        assert np.array_equal(blend_tiles(cut_tiles(big, plan), plan), big)


def hard_stitch(tiles: list[np.ndarray], plan) -> np.ndarray:
    """Tiles pasted in order, each over the last: what tiling without feathering gives."""
    out = np.zeros((plan.height, plan.width, tiles[0].shape[2]), np.uint8)
    for tile, t in zip(tiles, plan.tiles):
        out[t.y : t.y + t.height, t.x : t.x + t.width] = tile
    return out


@pytest.mark.parametrize("name", PHOTOS)
def test_tiles_that_drift_slightly_meet_without_a_seam(name):
    big = upscale(photo(name, 384), 2.0)  # [512|768, 768, 3]
    plan = plan_tiles(big.shape[1], big.shape[0], 256, 64)
    offsets = np.random.default_rng(0).choice([-4, -2, 2, 4], len(plan.tiles))  # each tile's colours drift
    drifted = [np.clip(t.astype(int) + o, 0, 255).astype(np.uint8) for t, o in zip(cut_tiles(big, plan), offsets)]
    untiled = tile_seam_score(big, plan)
    feathered = tile_seam_score(blend_tiles(drifted, plan), plan)
    stitched = tile_seam_score(hard_stitch(drifted, plan), plan)
    assert abs(feathered - untiled) < 0.03  # tile edges step no more than they did before tiling
    assert stitched > untiled + 0.6 and stitched > 1.5 * untiled  # a hard stitch shows its seams


def test_blend_checks_its_tiles():
    plan = plan_tiles(512, 512, 256, 64)
    tiles = cut_tiles(np.zeros((512, 512, 3), np.uint8), plan)
    with pytest.raises(ValueError, match=f"plan has {len(tiles)} tiles, got 1"):
        blend_tiles(tiles[:1], plan)
    with pytest.raises(ValueError, match=r"tile 1 is \(8, 8, 3\), expected \(256, 256, 3\)"):
        blend_tiles([tiles[0], np.zeros((8, 8, 3), np.uint8), *tiles[2:]], plan)
    with pytest.raises(ValueError, match="image is 256x512, plan is for 512x512"):
        cut_tiles(np.zeros((512, 256, 3), np.uint8), plan)
