"""The one error of image conditioning: a request whose input image, mask or geometry cannot be used.

A bulk row that raises it becomes a `failed` catalog row (`error` = the message, the reason code
in front); the HTTP ingress answers with `http_status`. Every message names the uri or value and
the limit it broke.
"""

from __future__ import annotations

# reason code → HTTP status the ingress answers with
REASONS: dict[str, int] = {
    "image_uri": 422,  # empty or unusable location
    "image_missing": 422,  # no file / no object at the location
    "image_unreadable": 422,  # I/O error, truncated or corrupt data, not an image
    "image_too_large": 413,  # more bytes than the limit
    "image_pixels": 413,  # more pixels than the limit, or a decompression bomb
    "image_format": 415,  # a format that is not allowed (GIF, TIFF, BMP …)
    "image_animated": 415,  # more than one frame
    "mask_size": 422,  # mask and image differ in size
    "mask_keeps_all": 422,  # the mask generates nothing
    "mask_keeps_none": 422,  # the mask keeps nothing (where something must be kept)
    "mask_band": 422,  # the kept region is thinner than the paste-back band
    "outpaint_target": 422,  # unknown preset, bad ratio or size, nothing to add
    "upscale_settings": 422,  # bad scale, tile size or overlap
    "mode": 422,  # not a known mode
    "strength": 422,  # outside (0, 1]
    "resize_mode": 422,  # not crop, fill or stretch
    "input_changed": 409,  # the input's bytes are not the ones the request was made from
}


class ConditioningError(ValueError):
    """An input image, mask or geometry that cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown conditioning error reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message

    @property
    def http_status(self) -> int:
        return REASONS[self.reason]

    def __reduce__(self):  # Ray ships exceptions between processes by pickling
        return (type(self), (self.reason, self.detail))
