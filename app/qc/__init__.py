"""Image QC: measurements (`checks`) and the accept / review / reject verdict (`decision`)."""

from app.qc.checks import clipped_shares, contrast, decode_image, luminance, mean_luma, sharpness
from app.qc.decision import KNOWN_CHECKS, QcSettings, QcVerdict, check_image, check_image_bytes

__all__ = [
    "KNOWN_CHECKS",
    "QcSettings",
    "QcVerdict",
    "check_image",
    "check_image_bytes",
    "clipped_shares",
    "contrast",
    "decode_image",
    "luminance",
    "mean_luma",
    "sharpness",
]
