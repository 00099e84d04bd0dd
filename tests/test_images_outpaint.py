"""Outpainting geometry: targets, canvases in multiples of 8, placement, masks, fills, render sizes."""

from __future__ import annotations

import numpy as np
import pytest
from photos import photo

from app.conditioning import ConditioningError, OutpaintTarget, outpaint_canvas, parse_target, render_size_for_ratio
from app.conditioning.outpaint import PLATFORM_RATIOS, canvas_size


def test_targets_parse_from_ratios_sizes_and_platforms():
    assert parse_target("9:16") == OutpaintTarget(ratio=9 / 16)
    assert parse_target(" 1.91 : 1 ") == OutpaintTarget(ratio=1.91)
    assert parse_target("1080x1920") == OutpaintTarget(width=1080, height=1920)
    assert parse_target("instagram_portrait") == OutpaintTarget(ratio=0.8)
    assert parse_target("linkedin").ratio == pytest.approx(1.91)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("banner", "'banner' is neither a ratio \\(9:16\\), a size \\(1080x1920\\) nor a platform \\(instagram_square"),
        ("0:1", "ratio '0:1' must be positive and between 1:10 and 10:1"),
        ("20:1", "ratio '20:1' must be positive"),
        ("1001x512", "size '1001x512': width and height must be multiples of 8"),
        ("32x32", "size '32x32'"),
    ],
)
def test_bad_targets_are_named(value, message):
    with pytest.raises(ConditioningError, match=message) as e:
        parse_target(value)
    assert e.value.reason == "outpaint_target"


@pytest.mark.parametrize("name", ["9:16", "4:5", "1.91:1", "16:9", "1:1", "instagram_story", "pinterest"])
def test_canvas_has_the_ratio_holds_the_image_and_is_in_multiples_of_8(name):
    pixels = photo("astronaut", 300)[:, :250]  # [300, 250, 3]: neither side a multiple of 8
    canvas = outpaint_canvas(pixels, parse_target(name))
    cw, ch = canvas.size
    h, w = pixels.shape[:2]
    ratio = parse_target(name).ratio
    assert cw % 8 == 0 and ch % 8 == 0 and cw >= w and ch >= h
    assert min(cw - w, ch - h) < 8  # the smallest such canvas: one side only grows (up to rounding)
    assert cw / ch == pytest.approx(ratio, rel=8 / min(cw, ch))
    x, y, bw, bh = canvas.box
    assert (bw, bh, canvas.scale) == (w, h, 1.0)
    assert np.array_equal(canvas.pixels[y : y + h, x : x + w], pixels)  # the original's bytes, untouched
    assert not canvas.generate[y : y + h, x : x + w].any()
    assert canvas.generate.sum() == cw * ch - w * h


def test_anchor_places_the_original():
    pixels = photo("coffee", 200)  # [133, 200, 3]
    target = parse_target("9:16")
    centred = outpaint_canvas(pixels, target)
    top = outpaint_canvas(pixels, target, anchor="top")
    bottom = outpaint_canvas(pixels, target, anchor="bottom-right")
    cw, ch = centred.size
    assert centred.box[1] == round((ch - 133) / 2) and top.box[:2] == (0, 0)
    assert bottom.box[:2] == (cw - 200, ch - 133)
    assert outpaint_canvas(pixels, target, anchor=(0.5, 0.25)).box[1] == round((ch - 133) * 0.25)
    with pytest.raises(ConditioningError, match="anchor 'middle' is not one of center, top"):
        outpaint_canvas(pixels, target, anchor="middle")
    with pytest.raises(ConditioningError, match=r"anchor fractions must lie in \[0, 1\], got \(1.5, 0\)"):
        outpaint_canvas(pixels, target, anchor=(1.5, 0))


def test_exact_size_shrinks_an_image_that_does_not_fit_and_keeps_one_that_does():
    pixels = photo("astronaut", 512)  # [512, 512, 3]
    shrunk = outpaint_canvas(pixels, parse_target("512x256"))
    assert shrunk.size == (512, 256) and shrunk.scale == pytest.approx(0.5)
    assert shrunk.box == (128, 0, 256, 256)  # halved, centred
    kept = outpaint_canvas(pixels, parse_target("1024x1024"))
    x, y, w, h = kept.box
    assert kept.scale == 1.0 and (x, y, w, h) == (256, 256, 512, 512)
    assert np.array_equal(kept.pixels[y : y + h, x : x + w], pixels)
    with pytest.raises(ConditioningError, match=r"the image \(336x512\) already fills the 336x512 canvas"):
        outpaint_canvas(pixels[:, :336], OutpaintTarget(width=336, height=512))


def test_an_image_already_at_the_ratio_has_nothing_to_add():
    with pytest.raises(ConditioningError, match="already fills the 256x256 canvas"):
        outpaint_canvas(np.zeros((256, 256, 3), np.uint8), parse_target("1:1"))


@pytest.mark.parametrize("fill", ["edge", "reflect", "mean"])
def test_fills_continue_the_image_without_an_edge(fill):
    pixels = photo("chelsea", 256)  # [170, 256, 3]
    canvas = outpaint_canvas(pixels, parse_target("1:1"), fill=fill)
    x, y, w, _h = canvas.box
    new = canvas.pixels[canvas.generate].astype(float)  # [N, 3]
    assert canvas.fill == fill and new.std(axis=0).max() < pixels.std(axis=(0, 1)).max()  # calmer than the image
    if fill == "mean":
        assert np.array_equal(np.unique(new, axis=0), np.rint(pixels.reshape(-1, 3).mean(axis=0))[None])
    else:
        # the row just above the original continues its top row's colours
        above = canvas.pixels[y - 1, x : x + w].astype(float)
        assert np.abs(above - pixels[0]).mean() < 20
    with pytest.raises(ConditioningError, match="fill 'noise' is not one of edge, reflect, mean"):
        outpaint_canvas(pixels, parse_target("1:1"), fill="noise")


def test_canvas_size_of_a_wide_image_adds_height():
    assert canvas_size(1000, 500, OutpaintTarget(ratio=1.0)) == (1000, 1000, 1.0)
    assert canvas_size(500, 1000, OutpaintTarget(ratio=16 / 9)) == (1784, 1000, 1.0)


@pytest.mark.parametrize(
    ("ratio", "size"),
    [(1.0, (1024, 1024)), (9 / 16, (768, 1344)), (16 / 9, (1344, 768)), (4 / 5, (896, 1152)), (1.91, (1344, 704))],
)
def test_render_size_is_an_sdxl_bucket(ratio, size):
    width, height = render_size_for_ratio(ratio)
    assert (width, height) == size and width % 64 == 0 and height % 64 == 0
    assert 0.9 <= width * height / 2**20 <= 1.05


def test_render_size_for_every_platform_and_a_small_model():
    for w, h in PLATFORM_RATIOS.values():
        width, height = render_size_for_ratio(w / h)
        assert abs(np.log(width / height / (w / h))) < 0.04
    assert render_size_for_ratio(1.0, megapixels=0.0625, multiple=8) == (256, 256)
    assert render_size_for_ratio(9 / 16, megapixels=0.0625, multiple=8) == (184, 328)
    with pytest.raises(ConditioningError, match="multiple 12 \\(a multiple of 8\\)"):
        render_size_for_ratio(1.0, multiple=12)


def test_platform_ratios_agree_with_the_postprocessing_presets():
    from app.postprocess import PRESETS

    for name, (w, h) in PLATFORM_RATIOS.items():
        preset = PRESETS[name]
        assert preset.width / preset.height == pytest.approx(w / h, rel=0.01), name
