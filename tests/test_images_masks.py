"""Inpainting masks from mask images and alpha channels: convention, threshold, checks, blur."""

from __future__ import annotations

import io

import numpy as np
import pytest
from photos import photo
from PIL import Image

from app.conditioning import ConditioningError, mask_from_alpha, mask_from_image, model_mask
from app.conditioning.loading import decode_input_image


def loaded(pixels: np.ndarray, uri: str):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return decode_input_image(buffer.getvalue(), uri)


@pytest.fixture
def image():
    return loaded(photo("astronaut", 64), "astronaut.png")


def test_white_generates_black_keeps_grey_is_thresholded_at_128(image):
    grey = np.zeros((64, 64), np.uint8)
    grey[:, 16:32] = 127  # below mid-grey: kept
    grey[:, 32:48] = 128  # mid-grey: generated
    grey[:, 48:] = 255
    generate = mask_from_image(loaded(grey, "mask.png"), image)
    assert generate.dtype == np.bool_ and generate.shape == (64, 64)
    assert not generate[:, :32].any() and generate[:, 32:].all()


def test_a_colour_mask_is_read_by_its_luminance(image):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:32] = (255, 255, 255)
    rgb[32:] = (0, 0, 255)  # pure blue is dark (luminance 29): kept
    generate = mask_from_image(loaded(rgb, "mask.png"), image)
    assert generate[:32].all() and not generate[32:].any()


def test_mask_of_another_size_names_both_sizes(image):
    mask = loaded(np.full((32, 48), 255, np.uint8), "small-mask.png")
    with pytest.raises(ConditioningError, match="mask small-mask.png is 48x32 but image astronaut.png is 64x64"):
        mask_from_image(mask, image)


def test_masks_that_keep_everything_or_nothing_are_refused(image):
    with pytest.raises(ConditioningError, match="mask_keeps_all: black.png generates no pixel"):
        mask_from_image(loaded(np.zeros((64, 64), np.uint8), "black.png"), image)
    with pytest.raises(ConditioningError, match="mask_keeps_none: white.png keeps no pixel"):
        mask_from_image(loaded(np.full((64, 64), 255, np.uint8), "white.png"), image)


def test_alpha_transparent_generates_opaque_keeps():
    rgba = np.dstack([photo("chelsea", 64), np.zeros(photo("chelsea", 64).shape[:2], np.uint8)])
    rgba[10:30, 20:40, 3] = 255
    rgba[10:30, 40:44, 3] = 128  # half-transparent edge: kept
    rgba[10:30, 44:48, 3] = 127  # just below: generated
    generate = mask_from_alpha(loaded(rgba, "cutout.png"))
    keep = ~generate
    assert keep[10:30, 20:44].all() and keep.sum() == 20 * 24


def test_alpha_mask_needs_an_alpha_channel_and_something_to_keep(image):
    with pytest.raises(ConditioningError, match="astronaut.png has no alpha channel"):
        mask_from_alpha(image)
    clear = np.dstack([photo("astronaut", 64), np.zeros((64, 64), np.uint8)])
    with pytest.raises(ConditioningError, match="mask_keeps_none: alpha of clear.png keeps no pixel"):
        mask_from_alpha(loaded(clear, "clear.png"))


def test_model_mask_is_binary_without_blur_and_soft_with_it():
    generate = np.zeros((64, 64), bool)
    generate[:, 32:] = True
    hard = model_mask(generate)
    assert set(np.unique(hard)) == {0, 255}
    soft = model_mask(generate, blur_px=4)
    row = soft[32].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 0 < row[31] < 255 and 0 < row[32] < 255
    assert (np.diff(row) >= 0).all() and (np.diff(row) > 0).sum() >= 8  # a ramp, several pixels wide
    with pytest.raises(ValueError, match="blur_px must be ≥ 0, got -1"):
        model_mask(generate, blur_px=-1)
