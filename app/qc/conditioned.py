"""QC of image-conditioned outputs: did the kept region stay the input's, is there a visible seam,
did an upscale drift from its source? Judged on the numbers the generator measured when it pasted
the kept pixels back (app/conditioning/plan.py `Measures`), never on pixels read again here.

Which mode is judged on what:
- `inpaint`, `outpaint` (they keep pixels): `subject_changed` when the mean absolute difference over
  the kept pixels outside the blend band (`kept_mean_abs`, 0-255) is above `max_kept_difference`
  (1.0 by default: 1/255, the issue's "unchanged"; `paste_back` makes it exactly 0, so anything
  above it means the kept region was not pasted back or the input's bytes changed); `seam` when the
  seam score along the mask's border is above `max(max_seam, seam_input x seam_input_factor)`.
- `upscale`: `upscale_drift` when the output shrunk back to the input's size differs from it by more
  than `max_upscale_drift` on average (0-255); `seam` when `tile_seam` is above `max_tile_seam`.
- `img2img` changes every pixel by design: nothing is judged beyond the usual checks.
The measures go into the verdict's scores (and so the catalog's `qc_scores`) under their own names.

Calibration (app/conditioning/seams.py and tiles.py define the scores; numbers from scikit-image's
photographs and the packshots in specs/data/packshots, tests/test_qc_conditioned.py reproduces them):
- seam, kept region over another photo: a disc of radius 110 px of one photo (astronaut, coffee,
  chelsea, rocket; 448x336) kept over each other photo. The photo's own score along that ring
  (`seam_input`) is 0.85-1.11; a naive paste scores 2.38-5.74, `paste_back` with an 8-px band
  0.63-1.30, with the default 4-px band 1.15-2.07 (two of the twelve pairs, unrelated photos
  meeting in a visible edge, reach the bound below). A colour drift of 20
  levels in the generated region scores 1.27-3.97 pasted naively, 0.99-1.53 through a 4-px band.
- seam along a product's outline: the packshots' alpha as the keep mask (inpaint, and outpaint to
  9:16), each photo as the generated background, through `prepare` / `finish`: the input's own
  ring is busy (`seam_input` 1.21-5.52: a product's outline against its flat backdrop), the output
  scores 0.92-1.74. So the bound is `max(1.8, 2.0 x seam_input)`: no packshot composite reaches it,
  every naive paste of one photo over another does (2.44-6.56 times the photo's own score).
- tile_seam (upscale x2 of six photos, 256-px tiles overlapping by 64, each tile's colours drifted
  by up to 2, 4 or 8 levels): untiled and `blend_tiles` 0.70-1.39, hard-stitched tiles 1.57-2.46
  (drift 2), 2.09-4.07 (4), 3.07-7.68 (8). `max_tile_seam` = 1.5.
- source_difference (the same upscales, shrunk back with a box filter): a plain Lanczos round trip
  0.63-1.83; with Gaussian noise of sigma 6 levels 2.61-3.25; JPEG q50 1.63-3.24; a Gaussian blur
  of sigma 3 px 4.17-8.30 (a refinement that smooths); every pixel 12 levels lighter 12.2-12.6;
  another photograph 73-89. `max_upscale_drift` = 10.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

from app.conditioning.measures import Measures

KEEPING_MODES = ("inpaint", "outpaint")
CONDITIONED_CHECKS = ("kept_region", "seam", "upscale_drift")


class ConditionedBounds(Protocol):
    """The part of `QcSettings` (app/qc/decision.py) these checks read."""

    @property
    def enabled(self) -> tuple[str, ...]: ...

    @property
    def max_kept_difference(self) -> float: ...

    @property
    def max_seam(self) -> float: ...

    @property
    def seam_input_factor(self) -> float: ...

    @property
    def max_tile_seam(self) -> float: ...

    @property
    def max_upscale_drift(self) -> float: ...


def conditioned_scores(measures: Measures) -> dict[str, float]:
    """The measures as QC scores (those measured; `kept_pixels` as a float like every score)."""
    return {name: float(value) for name, value in measures.__dict__.items() if value is not None}


def seam_bound(measures: Measures, settings: ConditionedBounds) -> float:
    """The seam score above which an inpaint/outpaint output shows an edge its input did not have."""
    own = measures.seam_input if measures.seam_input is not None and math.isfinite(measures.seam_input) else 0.0
    return max(settings.max_seam, own * settings.seam_input_factor)


def judge_conditioned(mode: str, measures: Measures, settings: ConditionedBounds) -> tuple[dict[str, float], list[str]]:
    """(scores, reject reasons) of an image-conditioned output in `mode` with these measures."""
    scores = conditioned_scores(measures)
    rejects: list[str] = []
    enabled = set(settings.enabled)
    if mode in KEEPING_MODES:
        kept = measures.kept_mean_abs
        if "kept_region" in enabled and kept is not None and kept > settings.max_kept_difference:
            rejects.append("subject_changed")
        if "seam" in enabled and measures.seam is not None:
            scores["seam_bound"] = seam_bound(measures, settings)
            if measures.seam > scores["seam_bound"]:
                rejects.append("seam")
    elif mode == "upscale":
        drift = measures.source_difference
        if "upscale_drift" in enabled and drift is not None and drift > settings.max_upscale_drift:
            rejects.append("upscale_drift")
        if "seam" in enabled and measures.tile_seam is not None and measures.tile_seam > settings.max_tile_seam:
            rejects.append("seam")
    return scores, rejects


def measures_from_columns(values: Mapping[str, float | None]) -> Measures:
    """A `Measures` from `cond_<field>` values (NaN or missing: not measured)."""
    out: dict[str, float | int | None] = {}
    for name in Measures.__dataclass_fields__:
        value = values.get(f"cond_{name}")
        if value is None or math.isnan(float(value)):
            out[name] = None
        else:
            out[name] = int(value) if name == "kept_pixels" else float(value)
    return Measures(**out)  # type: ignore[arg-type]
