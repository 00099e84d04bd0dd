"""QC settings and the verdict: thresholds from the spec applied to the numbers in `checks.py`.

Every check has a reject bound and, between it and a pass, a "review" band: an image in the
band is kept but flagged for a person, so a threshold that is slightly off for some style of
image costs review time instead of silently discarding renders.

Default thresholds were picked on scikit-image's real photographs (astronaut, coffee, chelsea,
rocket, camera, coins, hubble_deep_field, immunohistochemistry), each resized to 512 px and
upscaled to 1024 px on the longer side (LANCZOS):

- sharpness of the originals: 233..1388 at 512 px, 175..1102 at 1024 px (chelsea is the
  softest); after a Gaussian blur with sigma 3: 1.0..3.6 at 512 px, 4.4..21.2 at 1024 px
  (sigma 3 at 1024 px is only sigma 1.5 at the 512 px working size, hence the higher values).
  Reject below 30, review below 100: a clear gap on both sides at both sizes.
  Very textured scenes (grass, gravel, a page of text) keep 44..51 after sigma 3 at 1024 px and
  land in review, not accept; so do the softest real photos (moon 42..65, retina 80..89).
  Sharpness scales with contrast squared, so a flattened photo also reports "blur".
- contrast (std of luma / 255) of the originals: 0.10..0.30 (the dim `moon` photo: 0.052);
  squeezed to 0.5 +- 0.06 of the range: 0.012..0.036. Reject below 0.045, review below 0.07.
- clipped share: the photos clip at most 0.13 (astronaut's black suit) and 0.22 (retina's black
  surround). Review above 0.3, reject above 0.6: product shots on pure white are legitimate and
  should reach a person rather than the bin.
- blank: std of luma / 255 below 0.008 (2 grey levels); the squeezed photos stay at 0.012 or
  more, a grey field with faint noise (std 1 level) measures 0.003.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.qc import checks

KNOWN_CHECKS = ("sharpness", "contrast", "exposure", "blank", "nonfinite")

# Bump when a measurement changes meaning (not when a threshold changes: thresholds are
# hashed into `qc_version`).
_ALGORITHM_VERSION = "qc1"


class QcSettings(BaseModel):
    """Thresholds for `check_image`. Reject bounds are `min_*` / `max_*`, review bands `review_*`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Variance of the Laplacian at 512 px on the longer side, in grey levels squared.
    min_sharpness: float = Field(30.0, ge=0.0)
    review_sharpness: float = Field(100.0, ge=0.0)
    # RMS contrast: std of luma / 255.
    min_contrast: float = Field(0.045, ge=0.0, le=0.5)
    review_contrast: float = Field(0.07, ge=0.0, le=0.5)
    # Share of pixels clipped to black (luma <= 2) or white (luma >= 253), dark and bright apart.
    max_clipped: float = Field(0.6, ge=0.0, le=1.0)
    review_clipped: float = Field(0.3, ge=0.0, le=1.0)
    # Std of luma / 255 under which the image is a near-uniform field.
    min_std_blank: float = Field(0.008, ge=0.0, le=0.5)
    enabled: tuple[str, ...] = KNOWN_CHECKS

    @field_validator("enabled")
    @classmethod
    def _known_checks(cls, enabled: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in enabled if name not in KNOWN_CHECKS]
        if unknown:
            raise ValueError(f"unknown QC checks {unknown}; valid checks are {list(KNOWN_CHECKS)}")
        if len(set(enabled)) != len(enabled):
            raise ValueError(f"QC checks are listed more than once in {list(enabled)}")
        return enabled

    @model_validator(mode="after")
    def _review_bands_are_on_the_pass_side(self) -> QcSettings:
        if self.review_sharpness < self.min_sharpness:
            raise ValueError(
                f"`review_sharpness` must be >= `min_sharpness`, but they are "
                f"{self.review_sharpness} and {self.min_sharpness}"
            )
        if self.review_contrast < self.min_contrast:
            raise ValueError(
                f"`review_contrast` must be >= `min_contrast`, but they are "
                f"{self.review_contrast} and {self.min_contrast}"
            )
        if self.review_clipped > self.max_clipped:
            raise ValueError(
                f"`review_clipped` must be <= `max_clipped`, but they are "
                f"{self.review_clipped} and {self.max_clipped}"
            )
        if self.min_std_blank > self.min_contrast:
            # Blank is the extreme of low contrast; the other order would call a blank
            # image merely low-contrast.
            raise ValueError(
                f"`min_std_blank` must be <= `min_contrast`, but they are "
                f"{self.min_std_blank} and {self.min_contrast}"
            )
        return self

    @property
    def qc_version(self) -> str:
        """Stable id of these settings, e.g. "qc1-3f2a9c0d1b7e", for the catalog and MLflow."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return f"{_ALGORITHM_VERSION}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class QcVerdict:
    """Outcome of QC for one image.

    `reasons` are machine-readable: reject reasons ("blur", "low_contrast", "overexposed",
    "underexposed", "blank", "nonfinite_output", "unreadable_image", "too_small") and review
    reasons ("borderline_blur", "borderline_low_contrast", "borderline_overexposed",
    "borderline_underexposed"). A rejected image lists its review reasons too.
    `scores` has "sharpness", "contrast", "exposure" (larger clipped share) and "mean_luma";
    NaN where the image could not be measured.
    """

    status: Literal["accepted", "review", "rejected"]
    reasons: tuple[str, ...]
    scores: dict[str, float] = field(default_factory=dict)


_SCORE_KEYS = ("sharpness", "contrast", "exposure", "mean_luma")


def _unmeasured(reason: str) -> QcVerdict:
    return QcVerdict(status="rejected", reasons=(reason,), scores={key: math.nan for key in _SCORE_KEYS})


def check_image(
    image: np.ndarray | Image.Image, settings: QcSettings, nonfinite_fraction: float = 0.0
) -> QcVerdict:
    """Judge one rendered image.

    Args:
        image: PIL image or uint8 array `[H, W]`, `[H, W, 3]` or `[H, W, 4]`.
        settings: thresholds and the enabled checks.
        nonfinite_fraction: share of the generator's output values that were NaN/inf (already
            replaced by 0 before the image was made); any is a reject.

    Images under 8x8 are rejected as "too_small" rather than raising, so one bad render never
    fails a batch.
    """
    if not (0.0 <= nonfinite_fraction <= 1.0):  # also false for NaN
        raise ValueError(f"`nonfinite_fraction` must be in [0, 1], but is {nonfinite_fraction}")

    # 1. Measure
    luma = checks.luminance(image)
    if checks.is_too_small(luma):
        return _unmeasured("too_small")
    dark, bright = checks.clipped_shares(luma)
    scores = {
        "sharpness": checks.sharpness(luma),
        "contrast": checks.contrast(luma),
        "exposure": max(dark, bright),
        "mean_luma": checks.mean_luma(luma),
    }

    # 2. Compare against thresholds; reject reasons first, then review reasons
    enabled = set(settings.enabled)
    rejects: list[str] = []
    reviews: list[str] = []
    if "nonfinite" in enabled and nonfinite_fraction > 0.0:
        rejects.append("nonfinite_output")
    blank = "blank" in enabled and scores["contrast"] < settings.min_std_blank
    if blank:
        # A uniform field is also "blurry" and "low contrast"; saying so adds nothing.
        rejects.append("blank")
    graded: list[tuple[str, bool, bool]] = []  # (reason, beyond the reject bound, in the review band)
    if "sharpness" in enabled and not blank:
        sharpness = scores["sharpness"]
        graded.append(("blur", sharpness < settings.min_sharpness, sharpness < settings.review_sharpness))
    if "contrast" in enabled and not blank:
        contrast = scores["contrast"]
        graded.append(("low_contrast", contrast < settings.min_contrast, contrast < settings.review_contrast))
    if "exposure" in enabled:
        graded.append(("underexposed", dark > settings.max_clipped, dark > settings.review_clipped))
        graded.append(("overexposed", bright > settings.max_clipped, bright > settings.review_clipped))
    for reason, rejected, borderline in graded:
        if rejected:
            rejects.append(reason)
        elif borderline:
            reviews.append(f"borderline_{reason}")

    # 3. Verdict
    status = "rejected" if rejects else "review" if reviews else "accepted"
    return QcVerdict(status=status, reasons=tuple(rejects + reviews), scores=scores)


def check_image_bytes(data: bytes, settings: QcSettings) -> QcVerdict:
    """`check_image` on encoded PNG/JPEG/WebP bytes; undecodable bytes give "unreadable_image"."""
    try:
        image = checks.decode_image(data)
    except ValueError:
        return _unmeasured("unreadable_image")
    return check_image(image, settings)
