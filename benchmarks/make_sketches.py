"""Regenerate the example concept sketches in specs/data/sketches/ from scikit-image's photographs.

    python -m benchmarks.make_sketches            # writes specs/data/sketches/
    python -m benchmarks.make_sketches --out DIR

Each photograph becomes a 512x512 greyscale ink-and-pencil drawing on white, the kind of sketch
a game studio starts an asset from: ink lines where the photo has edges (a difference of
Gaussians, as in the "XDoG" line-drawing filters, plus Canny edges), diagonal hatching where it
is dark, cross-hatching where it is darker, white elsewhere. Four grey levels only, so the PNGs
stay small. Deterministic: the same scikit-image, Pillow and scipy give the same pixels.

The prompts' subjects for these sketches are in specs/data/sketches/sketches.csv.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import feature

from benchmarks.packshots import coffee_cup

OUT = Path(__file__).resolve().parents[1] / "specs" / "data" / "sketches"
SIDE = 512

# The drawing's grey levels: paper, the two hatchings, ink.
PAPER, HATCH, CROSS_HATCH, INK = 255, 170, 140, 40
HATCH_BELOW, CROSS_HATCH_BELOW = 0.45, 0.25  # smoothed luma (0..1) under which a region is hatched
HATCH_PERIOD = 6  # px between hatching lines
MIN_STROKE = 16  # px: ink specks smaller than this (film grain, fur) are left out


def _luma(rgb: np.ndarray) -> np.ndarray:
    """`[H, W, 3]` uint8 -> `[H, W]` float32 in 0..1 (Rec. 601 weights)."""
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def _on_square(gray: np.ndarray, fill: float = 1.0) -> np.ndarray:
    """`gray` centred on a white square canvas (its longer side `fill` of the canvas), at SIDE px."""
    height, width = gray.shape
    side = round(max(height, width) / fill)
    canvas = np.ones((side, side), np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = gray
    resized = Image.fromarray(canvas, "F").resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def astronaut() -> np.ndarray:
    """`astronaut` as it is: the astronaut, the flag and the shuttle model."""
    return _on_square(_luma(skdata.astronaut()))  # [512, 512] -> [512, 512]


def cat() -> np.ndarray:
    """`chelsea`: a square around the cat's face."""
    return _on_square(_luma(skdata.chelsea())[:, 60:360])  # [300, 451] -> [300, 300]


def cup() -> np.ndarray:
    """The cup and saucer of `coffee`, cut out as for the packshots, on white."""
    cut = coffee_cup()
    return _on_square(_luma(cut.rgb) * cut.mask + (1.0 - cut.mask), fill=0.9)


def horse() -> np.ndarray:
    """`horse`, a black silhouette: a mid-grey horse on white, so it gets an outline and hatching."""
    return _on_square(np.where(skdata.horse(), 1.0, 0.4).astype(np.float32), fill=0.9)


@dataclass(frozen=True)
class Sketch:
    """A sketch: its file name's stem (the `asset` key in sketches.csv) and the photo it is drawn from."""

    asset: str
    photo: Callable[[], np.ndarray]  # -> [SIDE, SIDE] float32 luma in 0..1


SKETCHES = (Sketch("astronaut", astronaut), Sketch("cat", cat), Sketch("coffee_cup", cup), Sketch("horse", horse))


def draw(gray: np.ndarray) -> np.ndarray:
    """A photo's luma `[H, W]` float in 0..1 -> an ink-and-hatching drawing `[H, W]` uint8."""
    # 1. ink: where the fine blur is darker than the coarse one (the dark side of every edge), and edges
    fine, coarse = ndimage.gaussian_filter(gray, 1.6), ndimage.gaussian_filter(gray, 1.6 * 1.6)
    ink = ndimage.binary_opening(fine - 0.98 * coarse < -0.01) | feature.canny(gray, sigma=2.0)
    labels, count = ndimage.label(ink, structure=np.ones((3, 3)))
    sizes = ndimage.sum(ink, labels, index=range(1, count + 1))
    ink = np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_STROKE))
    # 2. tone: hatching by how dark the smoothed photo is
    tone = ndimage.gaussian_filter(gray, 3.0)
    rows, cols = np.indices(gray.shape)
    out = np.full(gray.shape, PAPER, np.uint8)
    out[(tone < HATCH_BELOW) & ((rows + cols) % HATCH_PERIOD == 0)] = HATCH
    out[(tone < CROSS_HATCH_BELOW) & ((rows - cols) % HATCH_PERIOD == 0)] = CROSS_HATCH
    out[ink] = INK
    return out


def write_sketches(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sketch in SKETCHES:
        path = out / f"{sketch.asset}.png"
        Image.fromarray(draw(sketch.photo()), "L").save(path, optimize=True)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write the PNGs to")
    args = parser.parse_args()
    for path in write_sketches(args.out):
        image = Image.open(path)
        print(f"{path}  {image.mode} {image.width}x{image.height}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
