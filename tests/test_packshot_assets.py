"""The example packshots in specs/data/packshots/ are what `benchmarks/make_packshots.py` makes, and
packshots.csv lists each with its product and, where a mask file decides what is kept, that mask."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
from PIL import Image

from app.plan import csv_string_types
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


def test_csv_lists_every_packshot_once_with_its_mask():
    # as a job reads an input CSV: every cell text, empty cells null
    columns = ["sku", "image", "product", "mask"]
    table = pacsv.read_csv(OUT / "packshots.csv", convert_options=csv_string_types(columns))
    assert table.column_names == columns
    rows = table.to_pylist()
    specs = OUT.parents[1]  # image and mask paths are relative to the specs' folder
    assert sorted(row["image"] for row in rows) == sorted(f"data/packshots/{name}.png" for name in CUTOUTS)
    assert len({row["sku"] for row in rows}) == len(rows) and all(row["product"] for row in rows)
    for row in rows:
        image = Image.open(specs / row["image"])
        if row["image"] == f"data/packshots/{MASKED}.png":
            # the mask file decides what is kept; it covers the image pixel for pixel
            assert row["mask"] == f"data/packshots/{MASKED}_mask.png"
            assert Image.open(specs / row["mask"]).size == image.size
        else:
            # no mask column: the image's alpha channel is the mask (transparent = generate)
            assert row["mask"] is None and image.mode == "RGBA", row
