"""What an image-conditioned output says about its input: the measures QC judges and the catalog
records (made by app/conditioning/plan.py `finish`). Apart from plan.py so QC can read them
without importing how they are made."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measures:
    """What an output says about its input, for QC and the catalog (None: not measured in this mode)."""

    kept_mean_abs: float | None = None  # 0–255: mean |output − input| over kept pixels outside the band
    kept_max_abs: float | None = None
    kept_pixels: int | None = None
    seam: float | None = None  # seam_score along the mask's border (about 1: no visible edge)
    seam_input: float | None = None  # the input's own score along the same ring (a product's outline is busy)
    tile_seam: float | None = None  # upscale: tile_seam_score of the output
    source_difference: float | None = None  # upscale: 0–255, the output shrunk back vs the input
    # inpaint/outpaint: QC's sharpness (variance of the luma's Laplacian) over the generated pixels
    # only; the kept product's own sharpness is the input's, not the render's
    generated_sharpness: float | None = None

    def as_columns(self) -> dict[str, float]:
        """As the float columns a generator adds to its batch (NaN for None)."""
        return {f"cond_{k}": np.nan if v is None else float(v) for k, v in self.__dict__.items()}


MEASURE_COLUMNS = tuple(f"cond_{k}" for k in Measures.__dataclass_fields__)
