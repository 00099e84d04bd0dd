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


# invisible-watermark's dwtDctSvd, vectorised over blocks (the library loops over them in Python),
# bit for bit the same layout, so the library's decoder (and SDXL's) reads our marks when given
# the same `scales`. Embedding changes only each block's largest singular value, so it needs
# that singular triplet (power iteration), not a full SVD; and only the approximation band
# changes, so the inverse Haar transform is a 2x2 spread of the change. The library marks only U
# (scales [0, 36, 0]); that did not survive JPEG q70 on 256² images (0 of 12 tiny-model renders,
# 87 % of bits), where luma at 24 as well did (12 of 12, PSNR 41.3 -> 39.6 dB). Two departures in
# the inverse transform: detail bands stay in their own places (the library swaps horizontal and
# vertical), and channels are rounded and clipped to 0..255 instead of wrapped by a cast.
SCALES = (24.0, 36.0, 0.0)  # quantisation step of the largest singular value per Y, U, V channel
_BLOCK = 4


def _dct_matrix(n: int = _BLOCK) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m  # orthonormal DCT-II, as cv2.dct


_DCT = _dct_matrix()


def _embed_bits(rgb: np.ndarray, bits: list[int]) -> np.ndarray:
    import cv2

    height, width = rgb.shape[:2]
    h4, w4 = height // 4 * 4, width // 4 * 4
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    for channel, scale in enumerate(SCALES):
        if scale <= 0:
            continue
        plane = yuv[:h4, :w4, channel].astype(np.float64)
        coeffs, rows, cols = _block_dct(_haar_ll(plane))  # [N, 4, 4]
        wanted = np.resize(np.asarray(bits, dtype=np.float64), len(coeffs))
        # Only the largest singular value changes: A' = A + (s0' - s0) u0 v0^T, no full SVD needed.
        s0, u0, v0 = _top_singular(coeffs)
        target = (s0 // scale + 0.25 + 0.5 * wanted) * scale
        delta = (target - s0)[:, None, None] * u0[:, :, None] * v0[:, None, :]
        delta_ll = _block_idct(delta, rows, cols)
        # The inverse Haar transform of a change in the approximation band alone: half of it on
        # each of the 2x2 pixels it came from.
        change = np.zeros((h4 // 2, w4 // 2))
        change[: rows * _BLOCK, : cols * _BLOCK] = delta_ll / 2
        plane.reshape(h4 // 2, 2, w4 // 2, 2)[...] += change[:, None, :, None]
        yuv[:h4, :w4, channel] = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)[:, :, ::-1])


def _haar_ll(plane: np.ndarray) -> np.ndarray:
    """The orthonormal Haar approximation band (pywt's `dwt2(..., "haar")[0]`): [H/2, W/2]."""
    return (plane[0::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 0::2] + plane[1::2, 1::2]) / 2


def _block_dct(band: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Orthonormal 2-D DCT of every 4x4 block, row-major: [N, 4, 4] (as cv2.dct per block)."""
    rows, cols = band.shape[0] // _BLOCK, band.shape[1] // _BLOCK
    grid = band[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK)
    # Two plain matrix products (einsum's batched path was 10x slower here)
    rows_done = grid @ _DCT.T  # [rows, 4, cols, 4(l)]
    coeffs = np.tensordot(_DCT, rows_done, axes=([1], [1])).transpose(1, 2, 0, 3)  # [rows, cols, k, l]
    return np.ascontiguousarray(coeffs).reshape(rows * cols, _BLOCK, _BLOCK), rows, cols


def _block_idct(coeffs: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of `_block_dct`: [rows * 4, cols * 4]."""
    grid = coeffs.reshape(rows, cols, _BLOCK, _BLOCK) @ _DCT  # [rows, cols, k, j]
    band = np.tensordot(_DCT.T, grid, axes=([1], [2])).transpose(1, 0, 2, 3)  # [rows, i, cols, j]
    return np.ascontiguousarray(band).reshape(rows * _BLOCK, cols * _BLOCK)


def _top_singular(a: np.ndarray, iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Largest singular value and its vectors of each [4, 4] matrix, by power iteration on A^T A.

    Image blocks have a dominant DC term, so a start near it converges in a few steps. An all-zero
    block gets the DC basis vectors, as an SVD would give some unit vectors.
    """
    gram = np.swapaxes(a, 1, 2) @ a
    v = np.broadcast_to(np.array([1.0, 0.3, 0.2, 0.1]), (len(a), _BLOCK)).copy()
    for _ in range(iterations):
        v = (gram @ v[:, :, None])[:, :, 0]
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    av = (a @ v[:, :, None])[:, :, 0]
    s0 = np.linalg.norm(av, axis=1)
    flat = s0 < 1e-9
    u = np.where(flat[:, None], np.eye(_BLOCK)[0], av / np.maximum(s0, 1e-300)[:, None])
    v = np.where(flat[:, None], np.eye(_BLOCK)[0], v)
    return s0, u, v


def _read_bits(rgb: np.ndarray) -> np.ndarray:
    """The share of blocks voting 1 for each of the TOTAL_BITS bits, over the marked channels."""
    import cv2

    height, width = rgb.shape[:2]
    h4, w4 = height // 4 * 4, width // 4 * 4
    yuv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, ::-1]), cv2.COLOR_BGR2YUV)
    ones, counts = np.zeros(TOTAL_BITS), np.zeros(TOTAL_BITS)
    for channel, scale in enumerate(SCALES):
        if scale <= 0:
            continue
        coeffs, _, _ = _block_dct(_haar_ll(yuv[:h4, :w4, channel].astype(np.float64)))
        s0 = np.linalg.svd(coeffs, compute_uv=False)[:, 0]
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
