"""Image QC: measurements (`checks`), the accept / review / reject verdict (`decision`), prompt
adherence (`clip`, imported on its own: it needs torch), near-duplicates (`duplicates`), style
consistency (`style`) and what a QC worker loads once (`models`)."""

from app.qc.checks import (
    artefact_scores,
    clipped_shares,
    contrast,
    decode_image,
    luminance,
    mean_luma,
    rgb_array,
    sharpness,
)
from app.qc.decision import (
    EVALUATE_SCORE_KEYS,
    KNOWN_CHECKS,
    QcSettings,
    QcVerdict,
    check_image,
    check_image_bytes,
    evaluate,
    evaluate_batch,
)
from app.qc.duplicates import DuplicateIndex, DuplicateMatch, PhashIndex, hamming, perceptual_hash
from app.qc.models import QcModels
from app.qc.style import StyleReference, style_key_for

__all__ = [
    "EVALUATE_SCORE_KEYS",
    "KNOWN_CHECKS",
    "DuplicateIndex",
    "DuplicateMatch",
    "PhashIndex",
    "QcModels",
    "QcSettings",
    "QcVerdict",
    "StyleReference",
    "artefact_scores",
    "check_image",
    "check_image_bytes",
    "clipped_shares",
    "contrast",
    "decode_image",
    "evaluate",
    "evaluate_batch",
    "hamming",
    "luminance",
    "mean_luma",
    "perceptual_hash",
    "rgb_array",
    "sharpness",
    "style_key_for",
]
