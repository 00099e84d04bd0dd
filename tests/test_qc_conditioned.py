"""QC of image-conditioned outputs: the decision on crafted measures, and the calibration of its
bounds on real photographs and the example packshots (the numbers in app/qc/conditioned.py)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from photos import photo
from PIL import Image
from scipy import ndimage

from app.conditioning.keep import paste_back
from app.conditioning.loading import load_input_image
from app.conditioning.measures import Measures
from app.conditioning.plan import ModeSettings, finish, plan_request, prepare
from app.conditioning.seams import seam_score
from app.conditioning.tiles import blend_tiles, cut_tiles, plan_tiles, tile_seam_score, upscale
from app.qc import QcSettings, evaluate_batch
from app.qc.conditioned import seam_bound

PACKSHOTS = Path(__file__).resolve().parents[1] / "specs" / "data" / "packshots"
# Pixel checks only, and the conditioned ones: the images here are photographs, not renders.
SETTINGS = QcSettings(enabled=("sharpness", "kept_region", "seam", "upscale_drift"))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def judge(measures: Measures | None, mode: str, settings: QcSettings = SETTINGS):
    image = photo("astronaut", 256)
    conditioning = None if measures is None else [(mode, measures)]
    return evaluate_batch([image], ["a photo"], settings, conditioning=conditioning)[0]


KEPT = Measures(kept_mean_abs=0.0, kept_max_abs=0.0, kept_pixels=5000, seam=1.2, seam_input=1.0)


def test_an_exact_kept_region_without_a_seam_passes_and_its_measures_are_scores():
    verdict = judge(KEPT, "inpaint")
    assert verdict.status == "accepted", verdict.reasons
    assert verdict.scores["kept_mean_abs"] == 0.0 and verdict.scores["kept_pixels"] == 5000.0
    assert verdict.scores["seam"] == 1.2 and verdict.scores["seam_input"] == 1.0
    assert verdict.scores["seam_bound"] == 2.0  # max(1.8, 2 x 1.0)


@pytest.mark.parametrize("mode", ["inpaint", "outpaint"])
def test_a_kept_region_that_moved_is_subject_changed(mode):
    moved = Measures(kept_mean_abs=1.5, kept_max_abs=40.0, kept_pixels=5000, seam=1.2, seam_input=1.0)
    verdict = judge(moved, mode)
    assert verdict.status == "rejected" and verdict.reasons == ("subject_changed",)
    # exactly at the tolerance (1/255 on average) still passes
    at_bound = Measures(kept_mean_abs=1.0, kept_max_abs=3.0, kept_pixels=5000, seam=1.2, seam_input=1.0)
    assert judge(at_bound, mode).status == "accepted"
    strict = QcSettings(enabled=SETTINGS.enabled, max_kept_difference=0.0)
    assert judge(Measures(kept_mean_abs=0.01, seam=1.0, seam_input=1.0), mode, strict).reasons == ("subject_changed",)


def test_a_seam_is_judged_against_the_inputs_own_outline():
    # An edge the input did not have: seam
    assert judge(Measures(kept_mean_abs=0.0, seam=2.5, seam_input=1.0), "inpaint").reasons == ("seam",)
    # A product's outline is busy in the input too: the same score passes there
    busy = Measures(kept_mean_abs=0.0, seam=2.5, seam_input=3.0)
    assert seam_bound(busy, SETTINGS) == 6.0
    assert judge(busy, "outpaint").status == "accepted"
    # No measure (a ring too small to score): nothing said about a seam
    assert judge(Measures(kept_mean_abs=0.0), "inpaint").status == "accepted"


def test_an_upscale_that_drifted_or_shows_its_tiles_is_rejected():
    good = Measures(tile_seam=1.1, source_difference=3.0)
    assert judge(good, "upscale").status == "accepted"
    assert judge(Measures(tile_seam=1.1, source_difference=12.5), "upscale").reasons == ("upscale_drift",)
    assert judge(Measures(tile_seam=2.1, source_difference=3.0), "upscale").reasons == ("seam",)
    assert judge(Measures(source_difference=3.0), "upscale").status == "accepted"  # one tile: no tile seam


def test_txt2img_and_img2img_are_not_judged_on_kept_pixels_and_checks_can_be_turned_off():
    moved = Measures(kept_mean_abs=9.0, seam=5.0, seam_input=1.0, source_difference=50.0, tile_seam=5.0)
    assert judge(None, "txt2img").status == "accepted"
    assert judge(moved, "img2img").status == "accepted"  # img2img redraws every pixel by design
    off = QcSettings(enabled=("sharpness",))
    assert judge(moved, "inpaint", off).status == "accepted"
    assert judge(moved, "upscale", off).status == "accepted"
    assert set(judge(moved, "inpaint").reasons) == {"subject_changed", "seam"}


def test_the_conditioned_bounds_are_validated_and_part_of_the_qc_version():
    assert QcSettings(max_kept_difference=0.5).qc_version != QcSettings().qc_version
    with pytest.raises(ValueError, match="max_kept_difference"):
        QcSettings(max_kept_difference=-1)


# --- calibration ---------------------------------------------------------------------------------
H, W = 336, 448


def scene(name: str) -> np.ndarray:
    return np.ascontiguousarray(photo(name)[:H, :W])


def disc(radius: float = 110) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - H / 2) ** 2 + (xx - W / 2) ** 2 <= radius**2


def seam_measures(output: np.ndarray, original: np.ndarray, keep: np.ndarray) -> Measures:
    return Measures(kept_mean_abs=0.0, seam=seam_score(output, keep), seam_input=seam_score(original, keep))


def test_calibration_seam_flags_every_naive_paste_and_a_wide_band_never():
    keep = disc()
    naive, feathered8, feathered4 = [], [], []
    for kept in PHOTOS:
        for other in PHOTOS:
            if other == kept:
                continue
            for band, out in ((0, naive), (8, feathered8), (4, feathered4)):
                composite = paste_back(scene(other), scene(kept), keep, band)
                measures = seam_measures(composite, scene(kept), keep)
                out.append(measures.seam / seam_bound(measures, SETTINGS))
    assert min(naive) > 1.0  # every hard edge between two photos reaches the bound
    assert max(feathered8) < 0.75  # an 8-px band: far below it
    assert min(feathered4) > 0.5 and sum(r > 1.0 for r in feathered4) == 2 and max(feathered4) < 1.2


@pytest.mark.parametrize("name", ["coffee_cup", "coin", "helmet", "rocket"])
def test_calibration_a_packshot_on_a_new_background_has_no_seam(name):
    """The product's outline is busy in the input; composited over real photos by `finish` it
    never reaches the bound (seam 0.92-1.74 against the input's own 1.21-5.52)."""
    image = load_input_image(str(PACKSHOTS / f"{name}.png"))
    modes = [("outpaint", "9:16")] + ([("inpaint", "")] if image.width >= 64 else [])
    for mode, target in modes:
        planned = plan_request(ModeSettings(mode=mode, target=target), image, None, 0, 0)
        prepared = prepare(planned.conditioning, image, None, planned.width, planned.height)
        height, width = prepared.image.shape[:2]
        for other in PHOTOS:
            background = np.asarray(Image.fromarray(photo(other)).resize((width, height)))
            _, measures = finish(prepared, background)
            assert measures.kept_mean_abs == 0.0
            assert 0.9 < measures.seam < 1.8 and 1.2 < measures.seam_input < 5.6
            verdict = judge(measures, mode)
            assert "seam" not in verdict.reasons and "subject_changed" not in verdict.reasons


def hard_stitch(tiles: list[np.ndarray], plan) -> np.ndarray:
    out = np.zeros((plan.height, plan.width, 3), np.uint8)
    for tile, t in zip(tiles, plan.tiles):
        out[t.y : t.y + t.height, t.x : t.x + t.width] = tile
    return out


UPSCALE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def test_calibration_tile_seam_bound_separates_blended_from_stitched_tiles():
    limit = SETTINGS.max_tile_seam
    for name in UPSCALE_PHOTOS:
        big = upscale(photo(name, 384), 2.0)
        plan = plan_tiles(big.shape[1], big.shape[0], 256, 64)
        offsets = np.random.default_rng(0).choice([-2, -1, 1, 2], len(plan.tiles))  # tiles drift 1-2 levels
        drifted = [np.clip(t.astype(int) + o, 0, 255).astype(np.uint8) for t, o in zip(cut_tiles(big, plan), offsets)]
        assert tile_seam_score(big, plan) < limit
        assert tile_seam_score(blend_tiles(drifted, plan), plan) < limit
        assert tile_seam_score(hard_stitch(drifted, plan), plan) > limit


def source_difference(output: np.ndarray, source: np.ndarray) -> float:
    """As app/conditioning/plan.finish measures it: the output shrunk back with a box filter."""
    small = Image.fromarray(output).resize(source.shape[1::-1], Image.Resampling.BOX)
    return float(np.abs(np.asarray(small).astype(np.int16) - source.astype(np.int16)).mean())


def test_calibration_upscale_drift_passes_refinements_and_catches_a_shift_or_another_picture():
    limit = SETTINGS.max_upscale_drift
    for name in UPSCALE_PHOTOS:
        source = photo(name, 384)
        big = upscale(source, 2.0)
        noisy = np.clip(big + np.random.default_rng(1).normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(big).save(buffer, "JPEG", quality=50)
        jpeg = np.asarray(Image.open(buffer))
        blurred = ndimage.gaussian_filter(big, (3, 3, 0))
        lighter = np.clip(big.astype(int) + 12, 0, 255).astype(np.uint8)
        other = np.asarray(
            Image.fromarray(photo("coins" if name != "coins" else "coffee", 768)).resize(big.shape[1::-1])
        )
        for refined in (big, noisy, jpeg, blurred):
            assert source_difference(refined, source) < limit
        for drifted in (lighter, other):
            assert source_difference(drifted, source) > limit
        verdict = judge(Measures(source_difference=source_difference(lighter, source)), "upscale")
        assert verdict.reasons == ("upscale_drift",) and not math.isnan(verdict.scores["source_difference"])


def test_an_inpaint_is_graded_for_blur_on_what_it_generated():
    """A sharp product around a blurred generated background is `blur`; the frame's own sharpness
    (the astronaut photo's, well above the bounds) no longer decides."""
    from dataclasses import replace

    assert "blur" not in judge(None, "txt2img").reasons  # the photo alone is sharp
    soft = judge(replace(KEPT, generated_sharpness=5.0), "outpaint")
    assert "blur" in soft.reasons and soft.scores["generated_sharpness"] == 5.0
    borderline = judge(replace(KEPT, generated_sharpness=60.0), "inpaint")
    assert "borderline_blur" in borderline.reasons and "blur" not in borderline.reasons
    assert judge(replace(KEPT, generated_sharpness=500.0), "inpaint").status == "accepted"


def test_the_generated_regions_sharpness_is_measured_on_its_pixels():
    """`finish` measures sharpness over the generated pixels only: a blurred background around a
    sharp kept photo reads as blurred."""
    image = load_input_image(str(PACKSHOTS / "coin.png"))
    planned = plan_request(ModeSettings(mode="outpaint", target="9:16"), image, None, 0, 0)
    prepared = prepare(planned.conditioning, image, None, planned.width, planned.height)
    height, width = prepared.image.shape[:2]
    sharp = photo("astronaut", max(width, height))[:height, :width]
    blurred = ndimage.gaussian_filter(sharp.astype(float), sigma=(4, 4, 0)).astype(np.uint8)
    _, on_sharp = finish(prepared, np.ascontiguousarray(sharp))
    _, on_blurred = finish(prepared, np.ascontiguousarray(blurred))
    assert on_blurred.generated_sharpness < 30.0 < on_sharp.generated_sharpness
