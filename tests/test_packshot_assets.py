"""The example packshots in specs/data/packshots/ are what `benchmarks/make_packshots.py` makes."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.make_packshots import MASKED, OUT, write_packshots
from benchmarks.packshots import CUTOUTS


def test_committed_assets_are_regenerated_byte_for_byte(tmp_path):
    fresh = write_packshots(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(p.name for p in OUT.glob("*.png"))
    for path in fresh:
        assert path.read_bytes() == (OUT / path.name).read_bytes(), path.name


def test_assets_are_small_rgba_cutouts_with_one_mask():
    total = 0
    for name in CUTOUTS:
        path = OUT / f"{name}.png"
        total += path.stat().st_size
        image = Image.open(path)
        assert image.mode == "RGBA" and max(image.size) <= 256, (name, image.mode, image.size)
        alpha = np.asarray(image)[..., 3]
        assert (alpha == 0).any() and (alpha == 255).mean() > 0.3, name  # transparent around a product
    mask_path = OUT / f"{MASKED}_mask.png"
    total += mask_path.stat().st_size
    assert total < 300_000
    # the mask: white = generate (the background), black = keep (the product), as inpainting masks read
    mask = np.asarray(Image.open(mask_path))
    alpha = np.asarray(Image.open(OUT / f"{MASKED}.png"))[..., 3]
    assert mask.shape == alpha.shape and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 0, alpha >= 128)
