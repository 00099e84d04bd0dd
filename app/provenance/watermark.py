"""An invisible watermark in every output: a sync word and a prefix of the image's id.

The method is invisible-watermark's DWT-DCT-SVD (`dwtDctSvd`), the one SDXL's reference
pipeline uses: one bit per 4x4 block of a channel's Haar approximation band (here luma and U), the
64 bits repeated over the frame and averaged when read. Measured on photographs (benchmarks/RESULTS.md):
it survives JPEG re-encoding and, read back at the size it was marked at, resizing; a crop that shifts the block grid breaks it, because
bits are laid out by block index.

Payload: a 16-bit sync word, then the first 12 hex digits (48 bits) of the image id. A reader
reports a watermark only when the sync word comes back with at most `MAX_SYNC_ERRORS` wrong bits
(an unmarked image passes that by chance with probability 137/65536 = 0.2 % per reading, and a
reading is tried at each of `RESYNC_SCALES`); the 48-bit prefix then names the catalog row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

METHOD = "dwtDctSvd"
SYNC_WORD = 0xA5C3  # 1010 0101 1100 0011: balanced, not a shift of itself
SYNC_BITS = 16
PAYLOAD_HEX = 12  # image id prefix: 48 bits
TOTAL_BITS = SYNC_BITS + 4 * PAYLOAD_HEX
MAX_SYNC_ERRORS = 2
MIN_PIXELS = 256 * 256  # the library refuses smaller frames
_HEX = re.compile(r"[0-9a-f]+")


class WatermarkError(ValueError):
    """A watermark that cannot be embedded (an image too small, a payload that is not hex)."""


@dataclass(frozen=True)
class WatermarkReading:
    payload: str  # 12 hex digits: the image id prefix
    sync_errors: int  # wrong bits in the sync word (0..MAX_SYNC_ERRORS)
    method: str = METHOD

    def to_dict(self) -> dict:
        return {"payload": self.payload, "sync_errors": self.sync_errors, "method": self.method}


def payload_for(image_id: str) -> str:
    """The payload embedded for `image_id`: its first 12 hex digits."""
    prefix = image_id[:PAYLOAD_HEX].lower()
    if len(prefix) != PAYLOAD_HEX or not _HEX.fullmatch(prefix):
        raise WatermarkError(
            f"a watermark payload is the first {PAYLOAD_HEX} hex digits of an image id, got {image_id!r}"
        )
    return prefix


def payload_bits(payload: str) -> list[int]:
    word = (SYNC_WORD << (4 * PAYLOAD_HEX)) | int(payload, 16)
    return [(word >> (TOTAL_BITS - 1 - k)) & 1 for k in range(TOTAL_BITS)]


def can_embed(width: int, height: int) -> bool:
    return width * height >= MIN_PIXELS


def embed(rgb: np.ndarray, image_id: str) -> np.ndarray:
    """`rgb` ([H, W, 3] uint8) with the watermark for `image_id`; a new array."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise WatermarkError(f"a watermark goes into [H, W, 3] uint8 pixels, got {rgb.dtype} {list(rgb.shape)}")
    height, width = rgb.shape[:2]
    if not can_embed(width, height):
        raise WatermarkError(f"an image of {width}x{height} is too small for the watermark (needs {MIN_PIXELS} pixels)")
    return _embed_bits(rgb, payload_bits(payload_for(image_id)))


# invisible-watermark's dwtDctSvd, vectorised over blocks (the library loops over them in Python:
# ~0.3 s per 1024² image, against a few ms here), bit for bit the same layout, so the library's
# decoder (and SDXL's) reads our marks when given the same `scales`. The library marks only U
# (scales [0, 36, 0]); that did not survive JPEG q70 on 256² images (0 of 12 tiny-model renders,
# 87 % of bits), where luma at 24 as well did (12 of 12, PSNR 41.3 -> 39.6 dB). Two departures in
# the inverse transform: detail bands go back in their own places (the library swaps horizontal
# and vertical), and channels are rounded and clipped to 0..255 instead of wrapped by a cast.
SCALES = (24.0, 36.0, 0.0)  # quantisation step of the largest singular value per Y, U, V channel
_BLOCK = 4


def _dct_matrix(n: int = _BLOCK) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m  # orthonormal DCT-II, as cv2.dct


_DCT = _dct_matrix()


def _blocks(band: np.ndarray) -> tuple[np.ndarray, int, int]:
    rows, cols = band.shape[0] // _BLOCK, band.shape[1] // _BLOCK
    view = band[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK).swapaxes(1, 2)
    return view.reshape(rows * cols, _BLOCK, _BLOCK), rows, cols  # blocks: [N, 4, 4], row-major


def _embed_bits(rgb: np.ndarray, bits: list[int]) -> np.ndarray:
    import cv2
    import pywt

    height, width = rgb.shape[:2]
    h4, w4 = height // 4 * 4, width // 4 * 4
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    for channel, scale in enumerate(SCALES):
        if scale <= 0:
            continue
        ca, details = pywt.dwt2(yuv[:h4, :w4, channel].astype(np.float64), "haar")
        blocks, rows, cols = _blocks(ca)  # [N, 4, 4]
        u, s, vh = np.linalg.svd(_DCT @ blocks @ _DCT.T)
        wanted = np.resize(np.asarray(bits, dtype=np.float64), len(blocks))
        s[:, 0] = (s[:, 0] // scale + 0.25 + 0.5 * wanted) * scale
        marked = _DCT.T @ (u * s[:, None, :]) @ vh @ _DCT
        ca = ca.copy()
        ca[: rows * _BLOCK, : cols * _BLOCK] = (
            marked.reshape(rows, cols, _BLOCK, _BLOCK).swapaxes(1, 2).reshape(rows * _BLOCK, cols * _BLOCK)
        )
        yuv[:h4, :w4, channel] = np.clip(np.rint(pywt.idwt2((ca, details), "haar")), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[:, :, ::-1])


def _read_bits(rgb: np.ndarray) -> np.ndarray:
    """The share of blocks voting 1 for each of the TOTAL_BITS bits, over the marked channels."""
    import cv2
    import pywt

    height, width = rgb.shape[:2]
    h4, w4 = height // 4 * 4, width // 4 * 4
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    ones, counts = np.zeros(TOTAL_BITS), np.zeros(TOTAL_BITS)
    for channel, scale in enumerate(SCALES):
        if scale <= 0:
            continue
        ca, _ = pywt.dwt2(yuv[:h4, :w4, channel].astype(np.float64), "haar")
        blocks, _, _ = _blocks(ca)
        s0 = np.linalg.svd(_DCT @ blocks @ _DCT.T, compute_uv=False)[:, 0]
        votes = (s0 % scale) > scale * 0.5
        index = np.arange(len(votes)) % TOTAL_BITS
        ones += np.bincount(index, weights=votes, minlength=TOTAL_BITS)
        counts += np.bincount(index, minlength=TOTAL_BITS)
    return ones / counts


# A downscaled copy has fewer blocks per row, so its bits land on other block indices; reading it
# at the scale it was marked at puts them back. Tried in order until the sync word appears.
RESYNC_SCALES = (1.0, 2.0)


def detect(rgb: np.ndarray) -> WatermarkReading | None:
    """The watermark in `rgb` ([H, W, 3] uint8), or None when there is none to be found.

    Reads the image as it is, then upscaled by each of `RESYNC_SCALES` (a copy resized to half).
    """
    from PIL import Image

    for scale in RESYNC_SCALES:
        frame = rgb
        if scale != 1.0:
            height, width = rgb.shape[:2]
            size = (round(width * scale), round(height * scale))
            frame = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
        reading = _detect_at(frame)
        if reading is not None:
            return reading
    return None


def _detect_at(rgb: np.ndarray) -> WatermarkReading | None:
    height, width = rgb.shape[:2]
    if not can_embed(width, height):
        return None
    shares = _read_bits(rgb)
    word = 0
    for share in shares:
        word = (word << 1) | int(share * 255 > 127)  # the library's rounding of the vote
    sync = word >> (4 * PAYLOAD_HEX)
    errors = bin(sync ^ SYNC_WORD).count("1")
    if errors > MAX_SYNC_ERRORS:
        return None
    payload = format(word & ((1 << (4 * PAYLOAD_HEX)) - 1), f"0{PAYLOAD_HEX}x")
    return WatermarkReading(payload=payload, sync_errors=errors)
