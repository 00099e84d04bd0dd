"""Regenerate the example packshots in specs/data/packshots/ from scikit-image's photographs.

    python -m benchmarks.make_packshots            # writes specs/data/packshots/
    python -m benchmarks.make_packshots --out DIR

Each product of `benchmarks/packshots.py` (cut out of a real photograph by a threshold or fitted
ellipses) as an RGBA PNG on a transparent background, its alpha the product's mask, at most 256 px
on a side; and, for the cup, an inpainting mask in the usual convention of masks (white: the model
generates these pixels, black: it keeps them), so the background is repainted and the product is
kept. Deterministic: the same scikit-image, Pillow and scipy give the same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.packshots import CUTOUTS, packshot

OUT = Path(__file__).resolve().parents[1] / "specs" / "data" / "packshots"
SIDE = 256
FILL = 0.85  # the product's longer side, as a share of the canvas
MASKED = "coffee_cup"


def write_packshots(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in CUTOUTS.items():
        rgba = packshot(make(), SIDE, FILL, alpha=True)  # [256, 256, 4]
        # crop the empty margin off: the asset is the product, the canvas is the caller's choice
        rows, cols = np.flatnonzero(rgba[..., 3].any(axis=1)), np.flatnonzero(rgba[..., 3].any(axis=0))
        rgba = np.ascontiguousarray(rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        rgba[rgba[..., 3] == 0, :3] = 0  # no colour hidden under full transparency
        path = out / f"{name}.png"
        Image.fromarray(rgba, "RGBA").save(path, optimize=True)
        written.append(path)
        if name == MASKED:
            # white (generate) where the product is not, black (keep) on the product
            generate = np.where(rgba[..., 3] >= 128, 0, 255).astype(np.uint8)
            mask_path = out / f"{name}_mask.png"
            Image.fromarray(generate, "L").save(mask_path, optimize=True)
            written.append(mask_path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write the PNGs to")
    args = parser.parse_args()
    for path in write_packshots(args.out):
        image = Image.open(path)
        print(f"{path}  {image.mode} {image.width}x{image.height}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
