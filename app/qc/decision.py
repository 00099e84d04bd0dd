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
- the subject: sharpness, contrast and white clipping leave out a plain light backdrop
  (`checks.subject_mask`): products cut out onto pure white (`benchmarks/packshots.py`) read as
  blurred (a third of the frame sharp, the rest a Laplacian of zero) and 0.5..0.99 clipped when
  the backdrop was counted; over the product they measure like the photos they were cut from.
- clipped share: the photos clip at most 0.13 (astronaut's black suit, dark) and 0.22 (retina's
  black surround); their products on white 0.01 white over the subject; the photos at 1.3 stops
  over (x2.5) 0.16..0.71 white, night scenes (rocket, hubble) 0.02..0.03. Review above 0.3,
  reject above 0.6 (one pair for both sides: a 30% black block must not read as underexposed).
  A product blown out to white merges with its backdrop: not measurable.
- blank: std of luma / 255 below 0.008 (2 grey levels); the squeezed photos stay at 0.012 or
  more, a grey field with faint noise (std 1 level) measures 0.003.

`evaluate_batch` / `evaluate` add the artefact checks of `checks.py`, prompt adherence and
negative concepts (CLIP's numbers, `clip_measures.ClipMeasure`), near-duplicates (`duplicates.py`)
and style (`style.py`). This module only judges: it never runs CLIP. The numbers come measured
from where CLIP runs, the QC worker (`models.QcModels`) or the generator (`clip_stage.py`).
`check_image` stays the pixel-only subset (sharpness, contrast, exposure, blank, nonfinite).
Precision and recall of every check on the photographs: `python -m benchmarks.qc_eval`.

- color cast: the smaller of the CIELab chroma of the brightest 5% of the frame and 3x that of
  its 10% most neutral cells (see `checks.color_cast`). Balanced photos 0..15 (coffee 14..15, the
  warm sunset 20 in its highlights alone, 9 now); scenes where one natural colour dominates (a red
  motorcycle, an orange suit, green and blue hue-rotated copies) 1..13, their highlights alone up
  to 80; under a 30% channel gain or a 40% colour tint mostly 20..75 (a blue gain on the warm
  sunset neutralises it: 11). Reject above 20, review above 16.
- black / green block: the largest rectangle of flat black / green cells, as a share of the
  frame. Real photos stay under 0.06; a pasted block of 30% reads 0.28. Reject above 0.2, review
  above 0.1.
- blockiness: the strongest 8 px grid phase over the median one. Photos 1.0..1.2 (a source that
  was itself JPEG-compressed 1.5); after JPEG q70 1.2..1.5, q10 1.9..3.8. Reject above 1.8,
  review above 1.5.
- banding: missing tones between evenly stepped tones of smooth areas. Photos 0..0.32,
  posterised to 6 bits 0.75, 4 bits 0.94. Reject above 0.7, review above 0.5.
- CLIP thresholds have no defaults: cosines depend on the model (ViT-B-32 and ViT-L-14 differ),
  so they are set per model once its weights are at hand. Until then `clip_score` is recorded
  and judges nothing.
- negative concepts: rejected when the concept's cosine is above `max_negative_similarity` and
  above the prompt's own cosine plus `negative_margin` (0 by default: the image must look more
  like "watermark" than like what was asked for). A prompt that names the concept ("a poster
  with text") skips it. The bound, like the CLIP thresholds, is model-dependent.
- style: no default thresholds either; `StyleReference.reference_distances` (the references'
  own spread) is the place to start.
- near-duplicates: pHash distance of resized or JPEG q70 copies 0..2, 3% crops 2..8, unrelated
  photos 20 and more. Reject at <= 6 bits, review at <= 10.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import app.qc.checks as checks
from app.conditioning.measures import Measures
from app.conditioning.seams import SEAM_SCORE_LIMIT
from app.qc.clip_measures import ClipMeasure, clip_model_id
from app.qc.conditioned import CONDITIONED_CHECKS, judge_conditioned
from app.qc.duplicates import DuplicateIndex, perceptual_hash

if TYPE_CHECKING:
    from app.qc.style import StyleReference

PIXEL_CHECKS = ("sharpness", "contrast", "exposure", "blank", "nonfinite")
ARTEFACT_CHECKS = ("color_cast", "black_block", "green_block", "blockiness", "banding")
MODEL_CHECKS = ("prompt", "negative_concepts", "duplicates", "style", "nsfw")
KNOWN_CHECKS = PIXEL_CHECKS + ARTEFACT_CHECKS + MODEL_CHECKS + CONDITIONED_CHECKS

# How the run is executed, not how images are judged: left out of `qc_version`.
RUNTIME_FIELDS = frozenset({"clip_device", "clip_threads", "clip_batch_size", "clip_on_generator"})

# Bump when a measurement changes meaning (not when a threshold changes: thresholds are
# hashed into `qc_version`).
_ALGORITHM_VERSION = "qc2"  # qc2: a plain light backdrop left out of sharpness, contrast, clipping;
# colour cast also read from the most neutral cells


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
    # Bright clipping counts the subject only (a plain light backdrop is left out, see
    # `checks.subject_mask`).
    max_clipped: float = Field(0.6, ge=0.0, le=1.0)
    review_clipped: float = Field(0.3, ge=0.0, le=1.0)
    # Std of luma / 255 under which the image is a near-uniform field.
    min_std_blank: float = Field(0.008, ge=0.0, le=0.5)

    # Artefacts (`evaluate` only). CIELab chroma of the brightest 5% of the frame.
    max_color_cast: float = Field(20.0, ge=0.0)
    review_color_cast: float = Field(16.0, ge=0.0)
    # Share of the frame under the largest flat black / flat green region.
    max_black_block: float = Field(0.2, ge=0.0, le=1.0)
    review_black_block: float = Field(0.1, ge=0.0, le=1.0)
    max_green_block: float = Field(0.2, ge=0.0, le=1.0)
    review_green_block: float = Field(0.1, ge=0.0, le=1.0)
    # Strongest 8 px grid phase over the median phase (1.0: no grid).
    max_blockiness: float = Field(1.8, ge=1.0)
    review_blockiness: float = Field(1.5, ge=1.0)
    # Share of missing tones between the evenly stepped tones of smooth areas.
    max_banding: float = Field(0.7, ge=0.0, le=1.0)
    review_banding: float = Field(0.5, ge=0.0, le=1.0)

    # Prompt adherence. No `clip_model`: no CLIP at all (no clip_score, no style check).
    clip_model: str | None = None  # an open_clip architecture, e.g. "ViT-B-32"; "imagefab-tiny-clip" for tests
    clip_pretrained: str | None = None  # a tag ("laion2b_s34b_b79k") or a checkpoint path; None: random weights
    clip_seed: int = 0  # seeds random weights (clip_pretrained None)
    clip_device: Literal["auto", "cpu", "cuda"] = "auto"
    clip_threads: int | None = Field(None, ge=1)  # torch CPU threads in the QC process; None: torch's default
    clip_batch_size: int = Field(32, ge=1)
    # Where CLIP embeds the images: on the generator's device right after rendering (True), in the
    # QC worker (False), or "auto": on the generator when it has a CUDA device. See
    # `clip_runs_on_generator`; clip_device / clip_threads then only concern the QC worker.
    clip_on_generator: Literal["auto"] | bool = "auto"
    # Raw cosine(image, prompt). No default: it depends on the model (see the module docstring).
    min_clip_score: float | None = Field(None, ge=-1.0, le=1.0)
    review_clip_score: float | None = Field(None, ge=-1.0, le=1.0)
    # Rejected as negative_concept:<c> when cosine(image, c) > max_negative_similarity and
    # > cosine(image, prompt) + negative_margin; concepts the prompt itself names are skipped.
    negative_concepts: tuple[str, ...] = ()
    max_negative_similarity: float = Field(0.25, ge=-1.0, le=1.0)
    negative_margin: float = Field(0.0, ge=-2.0, le=2.0)

    # Near-duplicates: pHash Hamming distance in bits to an earlier image (catalog or this run).
    max_duplicate_distance: int = Field(6, ge=0, le=64)
    review_duplicate_distance: int = Field(10, ge=0, le=64)

    # NSFW (NudeNet's detector, app/provenance/screening.py; applied by `QcModels`): the highest
    # explicit-class confidence. Ordinary photographs score 0 to low values (benchmarks/RESULTS.md).
    max_nsfw: float = Field(0.6, ge=0.0, le=1.0)
    review_nsfw: float = Field(0.4, ge=0.0, le=1.0)

    # Image-conditioned outputs (app/qc/conditioned.py, where the numbers were calibrated).
    # Inpaint/outpaint: mean |output - input| over the kept pixels outside the blend band, 0-255.
    max_kept_difference: float = Field(1.0, ge=0.0, le=255.0)
    # Seam score along the mask's border: `seam` above max(max_seam, the input's own score x factor).
    max_seam: float = Field(SEAM_SCORE_LIMIT, ge=0.0)
    seam_input_factor: float = Field(2.0, ge=0.0)
    # Upscale: steps across tile edges over steps elsewhere; the output shrunk back vs its source, 0-255.
    max_tile_seam: float = Field(1.5, ge=0.0)
    max_upscale_drift: float = Field(10.0, ge=0.0, le=255.0)

    # Style: key (a combination key, or "<tag>=<value>") -> folder of reference images.
    style_references: dict[str, str] = {}
    max_style_distance: float | None = Field(None, ge=0.0, le=2.0)
    review_style_distance: float | None = Field(None, ge=0.0, le=2.0)

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

    @field_validator("negative_concepts")
    @classmethod
    def _concepts_are_words(cls, concepts: tuple[str, ...]) -> tuple[str, ...]:
        concepts = tuple(concept.strip() for concept in concepts)
        if any(not concept for concept in concepts):
            raise ValueError(f"`negative_concepts` must not contain empty entries, but is {list(concepts)}")
        if len(set(concepts)) != len(concepts):
            raise ValueError(f"`negative_concepts` lists a concept more than once: {list(concepts)}")
        return concepts

    @field_validator("style_references")
    @classmethod
    def _style_keys_and_folders(cls, references: dict[str, str]) -> dict[str, str]:
        for key, folder in references.items():
            if not key.strip() or not str(folder).strip():
                raise ValueError(f"`style_references` needs a non-empty key and folder, but has {key!r}: {folder!r}")
            name, sep, value = key.partition("=")
            if sep and (not name or not value):
                raise ValueError(f"`style_references` key {key!r} must read '<tag>=<value>' or be a combination key")
        return references

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
                f"`review_clipped` must be <= `max_clipped`, but they are {self.review_clipped} and {self.max_clipped}"
            )
        for reject, review in [
            ("max_color_cast", "review_color_cast"),
            ("max_black_block", "review_black_block"),
            ("max_green_block", "review_green_block"),
            ("max_blockiness", "review_blockiness"),
            ("max_banding", "review_banding"),
            ("max_style_distance", "review_style_distance"),
            ("max_nsfw", "review_nsfw"),
        ]:
            _review_at_most(self, review, reject)
        if (
            self.min_clip_score is not None
            and self.review_clip_score is not None
            and self.review_clip_score < self.min_clip_score
        ):
            raise ValueError(
                f"`review_clip_score` must be >= `min_clip_score`, but they are "
                f"{self.review_clip_score} and {self.min_clip_score}"
            )
        if self.review_duplicate_distance < self.max_duplicate_distance:
            raise ValueError(
                f"`review_duplicate_distance` must be >= `max_duplicate_distance`, but they are "
                f"{self.review_duplicate_distance} and {self.max_duplicate_distance}"
            )
        if self.clip_model is None:
            needs_clip = [
                name
                for name in ("clip_pretrained", "min_clip_score", "review_clip_score")
                if getattr(self, name) is not None
            ] + [name for name in ("negative_concepts", "style_references") if getattr(self, name)]
            needs_clip += ["clip_on_generator"] if self.clip_on_generator is True else []
            if needs_clip:
                raise ValueError(f"{needs_clip} need a CLIP model, but `clip_model` is not set")
        if self.min_std_blank > self.min_contrast:
            # Blank is the extreme of low contrast; the other order would call a blank
            # image merely low-contrast.
            raise ValueError(
                f"`min_std_blank` must be <= `min_contrast`, but they are {self.min_std_blank} and {self.min_contrast}"
            )
        return self

    @property
    def clip_model_id(self) -> str | None:
        """The `ClipScorer.model_id` these settings build (None without `clip_model`)."""
        return None if self.clip_model is None else clip_model_id(self.clip_model, self.clip_pretrained, self.clip_seed)

    def clip_runs_on_generator(self, generator_on_cuda: bool) -> bool:
        """Whether the generator measures CLIP (and QC grades its measures) rather than QC itself.

        Decided once, where the stages are wired (jobs/generate.py, app/serve/app.py), and
        passed to both sides.
        """
        if self.clip_model is None:
            return False
        return generator_on_cuda if self.clip_on_generator == "auto" else self.clip_on_generator

    @property
    def qc_version(self) -> str:
        """Stable id of these settings, e.g. "qc2-3f2a9c0d1b7e", for the catalog and MLflow.

        Covers every field that can change a verdict (thresholds, enabled checks, the CLIP model
        and tag, concepts, reference folders by path), not `RUNTIME_FIELDS`.
        """
        judged = self.model_dump(mode="json", exclude=set(RUNTIME_FIELDS))
        canonical = json.dumps(judged, sort_keys=True, separators=(",", ":"))
        return f"{_ALGORITHM_VERSION}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def _review_at_most(settings: QcSettings, review: str, reject: str) -> None:
    """For "larger is worse" measures the review bound sits below the reject bound."""
    low, high = getattr(settings, review), getattr(settings, reject)
    if low is not None and high is not None and low > high:
        raise ValueError(f"`{review}` must be <= `{reject}`, but they are {low} and {high}")


@dataclass(frozen=True)
class QcVerdict:
    """Outcome of QC for one image.

    `reasons` are machine-readable: reject reasons ("blur", "low_contrast", "overexposed",
    "underexposed", "blank", "nonfinite_output", "unreadable_image", "too_small") and review
    reasons ("borderline_blur", "borderline_low_contrast", "borderline_overexposed",
    "borderline_underexposed"). A rejected image lists its review reasons too.
    `scores` has "sharpness", "contrast", "exposure" (larger clipped share) and "mean_luma";
    NaN where the image could not be measured.

    Image-conditioned outputs (`conditioning=` of `evaluate_batch`) add the reject reasons
    "subject_changed", "seam" and "upscale_drift" and their measures' scores
    (app/qc/conditioned.py).

    From `evaluate` also: reject reasons "color_cast", "black_block", "green_block",
    "blockiness", "banding", "off_prompt", "negative_concept:<concept>", "off_style",
    "duplicate_of:<image_id>", and review reasons "borderline_<each of the first seven>"
    and "near_duplicate_of:<image_id>"; scores `EVALUATE_SCORE_KEYS` (NaN when not measured);
    `phash` (16 hex characters) and `nearest_duplicate` (an image_id within the review distance).
    """

    status: Literal["accepted", "review", "rejected"]
    reasons: tuple[str, ...]
    scores: dict[str, float] = field(default_factory=dict)
    phash: str | None = None
    nearest_duplicate: str | None = None


_SCORE_KEYS = ("sharpness", "contrast", "exposure", "mean_luma")
ARTEFACT_SCORE_KEYS = ARTEFACT_CHECKS
MODEL_SCORE_KEYS = ("clip_score", "negative_similarity", "style_distance", "style_phash_distance", "duplicate_distance")
EVALUATE_SCORE_KEYS = _SCORE_KEYS + ARTEFACT_SCORE_KEYS + MODEL_SCORE_KEYS


def _unmeasured(reason: str, keys: tuple[str, ...] = _SCORE_KEYS) -> QcVerdict:
    return QcVerdict(status="rejected", reasons=(reason,), scores={key: math.nan for key in keys})


@dataclass
class _Findings:
    """What the checks found so far for one image; turned into a `QcVerdict` at the end."""

    rejects: list[str] = field(default_factory=list)
    reviews: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    blank: bool = False

    def grade(self, reason: str, rejected: bool, borderline: bool) -> None:
        if rejected:
            self.rejects.append(reason)
        elif borderline:
            self.reviews.append(f"borderline_{reason}")

    def verdict(self, phash: str | None = None, nearest_duplicate: str | None = None) -> QcVerdict:
        status: Literal["accepted", "review", "rejected"] = (
            "rejected" if self.rejects else "review" if self.reviews else "accepted"
        )
        return QcVerdict(status, tuple(self.rejects + self.reviews), self.scores, phash, nearest_duplicate)


def _grade_generated_sharpness(found: _Findings, generated: float | None, settings: QcSettings) -> None:
    """An inpaint or outpaint is blurry when what it generated is: its kept product's sharpness is
    the input's own, so the whole-frame blur grade gives way to one over the generated pixels."""
    if generated is None or "sharpness" not in settings.enabled or found.blank:
        return
    found.rejects = [r for r in found.rejects if r != "blur"]
    found.reviews = [r for r in found.reviews if r != "borderline_blur"]
    found.grade("blur", generated < settings.min_sharpness, generated < settings.review_sharpness)


def _check_nonfinite_fraction(nonfinite_fraction: float) -> None:
    if not (0.0 <= nonfinite_fraction <= 1.0):  # also false for NaN
        raise ValueError(f"`nonfinite_fraction` must be in [0, 1], but is {nonfinite_fraction}")


def _pixel_findings(luma: np.ndarray, settings: QcSettings, nonfinite_fraction: float) -> _Findings:
    """The checks of `check_image` on a measurable luma plane."""
    # 1. Measure; sharpness, contrast and clipping over the subject, without a plain light
    #    backdrop (a packshot's white holds no detail to be sharp or to lose)
    #    Dark clipping is counted over the frame: a backdrop is never dark, and a black product in
    #    a bright frame is exposed as it should be.
    subject = checks.subject_mask(luma)
    dark, _ = checks.clipped_shares(luma)
    _, bright = checks.clipped_shares(luma, subject)
    found = _Findings(
        scores={
            "sharpness": checks.sharpness(luma, subject=subject),
            "contrast": checks.contrast(luma, subject),
            "exposure": max(dark, bright),
            "mean_luma": checks.mean_luma(luma),
        }
    )

    # 2. Compare against thresholds; reject reasons first, then review reasons
    enabled = set(settings.enabled)
    if "nonfinite" in enabled and nonfinite_fraction > 0.0:
        found.rejects.append("nonfinite_output")
    found.blank = "blank" in enabled and found.scores["contrast"] < settings.min_std_blank
    if found.blank:
        # A uniform field is also "blurry" and "low contrast"; saying so adds nothing.
        found.rejects.append("blank")
    if "sharpness" in enabled and not found.blank:
        sharpness = found.scores["sharpness"]
        found.grade("blur", sharpness < settings.min_sharpness, sharpness < settings.review_sharpness)
    if "contrast" in enabled and not found.blank:
        contrast = found.scores["contrast"]
        found.grade("low_contrast", contrast < settings.min_contrast, contrast < settings.review_contrast)
    if "exposure" in enabled:
        found.grade("underexposed", dark > settings.max_clipped, dark > settings.review_clipped)
        found.grade("overexposed", bright > settings.max_clipped, bright > settings.review_clipped)
    return found


def check_image(image: np.ndarray | Image.Image, settings: QcSettings, nonfinite_fraction: float = 0.0) -> QcVerdict:
    """Judge one rendered image on its pixels (sharpness, contrast, exposure, blank, nonfinite).

    Args:
        image: PIL image or uint8 array `[H, W]`, `[H, W, 3]` or `[H, W, 4]`.
        settings: thresholds and the enabled checks.
        nonfinite_fraction: share of the generator's output values that were NaN/inf (already
            replaced by 0 before the image was made); any is a reject.

    Images under 8x8 are rejected as "too_small" rather than raising, so one bad render never
    fails a batch. `evaluate` adds the artefact, CLIP, duplicate and style checks.
    """
    _check_nonfinite_fraction(nonfinite_fraction)
    luma = checks.luminance(image)
    if checks.is_too_small(luma):
        return _unmeasured("too_small")
    return _pixel_findings(luma, settings, nonfinite_fraction).verdict()


def check_image_bytes(data: bytes, settings: QcSettings) -> QcVerdict:
    """`check_image` on encoded PNG/JPEG/WebP bytes; undecodable bytes give "unreadable_image"."""
    try:
        image = checks.decode_image(data)
    except ValueError:
        return _unmeasured("unreadable_image")
    return check_image(image, settings)


# --- the whole of QC ------------------------------------------------------------------------------


def evaluate(
    image: np.ndarray | Image.Image,
    prompt: str | None,
    settings: QcSettings,
    *,
    clip_measure: ClipMeasure | None = None,
    duplicates: DuplicateIndex | None = None,
    style: StyleReference | None = None,
    image_id: str | None = None,
    nonfinite_fraction: float = 0.0,
) -> QcVerdict:
    """Judge one image with every enabled check; see `evaluate_batch`."""
    return evaluate_batch(
        [image],
        [prompt],
        settings,
        duplicates=duplicates,
        styles=[style],
        image_ids=None if image_id is None else [image_id],
        nonfinite_fractions=[nonfinite_fraction],
        clip_measures=None if clip_measure is None else [clip_measure],
    )[0]


def evaluate_batch(
    images: Sequence[np.ndarray | Image.Image],
    prompts: Sequence[str | None],
    settings: QcSettings,
    *,
    clip_measures: Sequence[ClipMeasure | None] | None = None,
    duplicates: DuplicateIndex | None = None,
    styles: Sequence[StyleReference | None] | None = None,
    image_ids: Sequence[str] | None = None,
    nonfinite_fractions: Sequence[float] | None = None,
    duplicate_groups: Sequence[str | None] | None = None,
    conditioning: Sequence[tuple[str, Measures] | None] | None = None,
) -> list[QcVerdict]:
    """Judge a batch of images: pixel and artefact checks, then CLIP's numbers, then the
    duplicate index (one `query_and_add_many` call, in batch order).

    Args:
        images: uint8 arrays or PIL images, as for `check_image`.
        prompts: the prompt of each image (None or "": no prompt-adherence check for it).
        settings: thresholds and enabled checks.
        clip_measures: each image's CLIP numbers (`clip_measures.measure_clip`, in the QC worker
            or on the generator), made by the model and for the concepts `settings` name; None
            skips the prompt, negative-concept and style checks. An image that is measured
            (at least 8x8) without one raises `ValueError`.
        duplicates: a `PhashIndex` or an adapter for a shared one; None skips the duplicate
            check (the pHash is still computed while "duplicates" is enabled).
        styles: the `StyleReference` for each image, or None (see `style.style_key_for`).
        image_ids: required with `duplicates`: what a later duplicate points to.
        nonfinite_fractions: per image, as for `check_image`.
        conditioning: per image, its mode and the generator's `Measures` for an image-conditioned
            output (None for txt2img): kept region, seam and upscale checks (app/qc/conditioned.py).

    Every verdict has all of `EVALUATE_SCORE_KEYS` (NaN where not measured). An image that
    was rejected for another reason is not added to the duplicate index.
    """
    count = len(images)
    styles = [None] * count if styles is None else list(styles)
    nonfinite_fractions = [0.0] * count if nonfinite_fractions is None else list(nonfinite_fractions)
    lengths = {"prompts": len(prompts), "styles": len(styles), "nonfinite_fractions": len(nonfinite_fractions)}
    if image_ids is not None:
        lengths["image_ids"] = len(image_ids)
    if clip_measures is not None:
        lengths["clip_measures"] = len(clip_measures)
    if conditioning is not None:
        lengths["conditioning"] = len(conditioning)
    for name, length in lengths.items():
        if length != count:
            raise ValueError(f"{count} images but {length} {name}")
    if duplicates is not None and image_ids is None:
        raise ValueError("`image_ids` are needed with a duplicate index: a later duplicate points to them")
    if any(style is not None for style in styles) and clip_measures is None:
        raise ValueError("style references need CLIP embeddings of the images, but `clip_measures` is None")
    for fraction in nonfinite_fractions:
        _check_nonfinite_fraction(fraction)
    enabled = set(settings.enabled)

    # 1. Pixels: the pixel checks, artefacts, pHash; `measured` holds the images that have pixels
    verdicts: list[QcVerdict | None] = [None] * count
    found: dict[int, _Findings] = {}
    phashes: dict[int, str] = {}
    for i, image in enumerate(images):
        rgb = checks.rgb_array(image)
        luma = checks.luminance(rgb)
        if checks.is_too_small(luma):
            verdicts[i] = _unmeasured("too_small", EVALUATE_SCORE_KEYS)
            continue
        found[i] = _pixel_findings(luma, settings, nonfinite_fractions[i])
        found[i].scores.update(checks.artefact_scores(rgb, luma))
        found[i].scores.update(dict.fromkeys(MODEL_SCORE_KEYS, math.nan))
        _grade_artefacts(found[i], settings, enabled)
        conditioned = None if conditioning is None else conditioning[i]
        if conditioned is not None:
            scores, rejects = judge_conditioned(conditioned[0], conditioned[1], settings)
            found[i].scores.update(scores)
            found[i].rejects += rejects
            _grade_generated_sharpness(found[i], conditioned[1].generated_sharpness, settings)
        if "duplicates" in enabled or styles[i] is not None:
            phashes[i] = perceptual_hash(rgb)
    measured = list(found)

    # 2. CLIP's numbers, as the QC worker or the generator measured them
    if measured and clip_measures is not None:
        measures = [_checked_measure(clip_measures[i], i, settings) for i in measured]
        _clip_checks(
            measures,
            [prompts[i] for i in measured],
            [styles[i] for i in measured],
            [phashes.get(i) for i in measured],
            [found[i] for i in measured],
            settings,
            enabled,
        )

    # 3. Duplicates, last: whether an image may be indexed depends on every other check
    nearest: dict[int, str] = {}
    if duplicates is not None and image_ids is not None and "duplicates" in enabled:
        hashed = [i for i in measured if i in phashes]
        matches = duplicates.query_and_add_many(
            [image_ids[i] for i in hashed],
            [phashes[i] for i in hashed],
            settings.review_duplicate_distance,
            reject_distance=settings.max_duplicate_distance,
            eligible=[not found[i].rejects for i in hashed],
            # Siblings (an A/B group) are meant to look alike: never duplicates of each other.
            groups=None if duplicate_groups is None else [duplicate_groups[i] for i in hashed],
        )
        for i, match in zip(hashed, matches):
            if match is None:
                continue
            match_id, distance = match
            found[i].scores["duplicate_distance"] = float(distance)
            nearest[i] = match_id
            if distance <= settings.max_duplicate_distance:
                found[i].rejects.append(f"duplicate_of:{match_id}")
            else:
                found[i].reviews.append(f"near_duplicate_of:{match_id}")

    # 4. Verdicts
    for i in measured:
        verdicts[i] = found[i].verdict(phashes.get(i), nearest.get(i))
    done = [verdict for verdict in verdicts if verdict is not None]
    if len(done) != count:
        raise RuntimeError(f"{count - len(done)} of {count} images got no QC verdict")
    return done


def _grade_artefacts(found: _Findings, settings: QcSettings, enabled: set[str]) -> None:
    if found.blank:
        return  # a uniform field is a black or green "block" too; "blank" says it already
    for name in ARTEFACT_CHECKS:
        if name in enabled:
            value = found.scores[name]
            found.grade(name, value > getattr(settings, f"max_{name}"), value > getattr(settings, f"review_{name}"))


def _mentions(prompt: str, concept: str) -> bool:
    """Whether the prompt names the concept itself (then it is wanted, not a defect)."""
    return re.search(rf"(?<!\w){re.escape(concept.lower())}(?!\w)", prompt.lower()) is not None


def _checked_measure(measure: ClipMeasure | None, i: int, settings: QcSettings) -> ClipMeasure:
    """A measure made elsewhere, if it was made by the model and for the concepts `settings` name."""
    if measure is None:
        raise ValueError(f"image {i} has no CLIP measures, but CLIP was to run on the generator")
    if measure.model_id != settings.clip_model_id:
        raise ValueError(
            f"image {i} was measured with CLIP {measure.model_id!r}, but the QC settings name "
            f"{settings.clip_model_id!r}; the generator and QC must be given the same settings"
        )
    if set(measure.concept_cosines) != set(settings.negative_concepts):
        raise ValueError(
            f"image {i} was measured against the concepts {sorted(measure.concept_cosines)}, but the QC "
            f"settings list {sorted(settings.negative_concepts)}"
        )
    return measure


def _clip_checks(
    measures: list[ClipMeasure],
    prompts: list[str | None],
    styles: list[StyleReference | None],
    phashes: list[str | None],
    found: list[_Findings],
    settings: QcSettings,
    enabled: set[str],
) -> None:
    # Prompt adherence: raw cosine to the prompt
    for k, measure in enumerate(measures):
        if not prompts[k]:
            continue
        score = measure.prompt_cosine
        found[k].scores["clip_score"] = score
        if "prompt" in enabled:
            low = settings.min_clip_score is not None and score < settings.min_clip_score
            borderline = settings.review_clip_score is not None and score < settings.review_clip_score
            found[k].grade("off_prompt", low, borderline)

    # Negative concepts: closer to the image than the threshold and than its own prompt
    concepts = settings.negative_concepts
    for k, measure in enumerate(measures if concepts else ()):
        prompt = prompts[k]
        applicable = [concept for concept in concepts if not (prompt and _mentions(prompt, concept))]
        if not applicable:
            continue
        sims = measure.concept_cosines
        found[k].scores["negative_similarity"] = max(sims[concept] for concept in applicable)
        if "negative_concepts" not in enabled:
            continue
        prompt_score = found[k].scores["clip_score"]
        for concept in applicable:
            beats_prompt = math.isnan(prompt_score) or sims[concept] > prompt_score + settings.negative_margin
            if sims[concept] > settings.max_negative_similarity and beats_prompt:
                found[k].rejects.append(f"negative_concept:{concept}")

    # Style: distance of the image embedding to the reference centroid
    for k, style in enumerate(styles):
        if style is None:
            continue
        distance = float(style.distances(measures[k].embedding[None, :], measures[k].model_id)[0])
        found[k].scores["style_distance"] = distance
        phash = phashes[k]
        if phash is not None:
            found[k].scores["style_phash_distance"] = style.median_phash_distance(phash)
        if "style" in enabled:
            far = settings.max_style_distance is not None and distance > settings.max_style_distance
            borderline = settings.review_style_distance is not None and distance > settings.review_style_distance
            found[k].grade("off_style", far, borderline)
