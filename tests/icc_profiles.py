"""A CMYK ICC profile built in memory for the loader's colour-management tests (no CMYK profile
ships with the system or the libraries here): ICC v2, printer class, CMYK → Lab through an A2B0
lut8 table computed from a given CMYK → sRGB formula."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageCms

D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def naive_rgb(cmyk: np.ndarray) -> np.ndarray:
    """[N, 4] inks in 0–1 → [N, 3] sRGB in 0–1: Pillow's plain formula, (1 − ink)(1 − black)."""
    return (1 - cmyk[:, :3]) * (1 - cmyk[:, 3:])


def cmyk_profile(to_rgb: Callable[[np.ndarray], np.ndarray] = naive_rgb, grid: int = 9) -> bytes:
    """The bytes of a CMYK profile whose colours are `to_rgb` sampled on a grid^4 lattice."""
    lattice = np.linspace(0, 1, grid)
    cmyk = np.array(list(itertools.product(lattice, repeat=4)))  # [grid^4, 4], first ink slowest
    rgb = np.rint(to_rgb(cmyk) * 255).astype(np.uint8).reshape(1, -1, 3)
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = np.asarray(ImageCms.applyTransform(Image.fromarray(rgb), to_lab)).reshape(-1, 3)
    # Pillow's LAB mode holds a*, b* as signed bytes; lut8's Lab encoding is the value + 128
    ab = (lab[:, 1:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    clut = np.concatenate([lab[:, :1], ab], axis=1).tobytes()
    identity = bytes(range(256))
    a2b0 = b"mft1" + bytes(4) + bytes([4, 3, grid, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a2b0 += identity * 4 + clut + identity * 3
    name = b"test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + struct.pack(">IIHB", 0, 0, 0, 0) + bytes(67)
    wtpt = b"XYZ " + bytes(4) + b"".join(_s15(v) for v in D50)
    cprt = b"text" + bytes(4) + b"no rights reserved\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"cprt", cprt), (b"A2B0", a2b0)]
    start = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        data += bytes(-len(data) % 4)  # tag data starts on 4-byte boundaries
        table += signature + struct.pack(">II", start + len(data), len(body))
        data += body
    data += bytes(-len(data) % 4)
    header = struct.pack(">I", start + len(data)) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
    header += struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(28)  # platform … rendering intent
    header += b"".join(_s15(v) for v in D50) + bytes(48)  # illuminant, creator, id, reserved
    return header + struct.pack(">I", len(tags)) + table + data
