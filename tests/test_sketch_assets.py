"""The example sketches in specs/data/sketches/ are what `benchmarks/make_sketches.py` draws, and
sketches.csv lists each of them with a subject for a prompt."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
from PIL import Image

from app.plan import csv_string_types
from benchmarks.make_sketches import CROSS_HATCH, HATCH, INK, OUT, PAPER, SIDE, SKETCHES, write_sketches

SPECS = OUT.parents[1]  # image paths in the CSV are relative to the specs' folder
COLUMNS = ["asset", "image", "subject"]


def read_csv() -> list[dict]:
    # as a job reads an input CSV: every cell text, empty cells null
    return pacsv.read_csv(OUT / "sketches.csv", convert_options=csv_string_types(COLUMNS)).to_pylist()


def test_committed_sketches_are_redrawn_pixel_for_pixel(tmp_path):
    fresh = write_sketches(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(p.name for p in OUT.glob("*.png"))
    for path in fresh:
        new, old = Image.open(path), Image.open(OUT / path.name)
        assert (new.mode, new.size) == (old.mode, old.size), path.name
        assert np.array_equal(np.asarray(new), np.asarray(old)), path.name


def test_sketches_are_small_greyscale_drawings_on_white():
    total = 0
    for sketch in SKETCHES:
        path = OUT / f"{sketch.asset}.png"
        total += path.stat().st_size
        image = Image.open(path)
        assert image.mode == "L" and image.size == (SIDE, SIDE), (sketch.asset, image.mode, image.size)
        pixels = np.asarray(image)
        assert set(np.unique(pixels)) <= {PAPER, HATCH, CROSS_HATCH, INK}, sketch.asset
        # mostly paper, and real strokes: a drawing, not a blank page or a photograph
        assert (pixels == PAPER).mean() > 0.5 and (pixels == INK).mean() > 0.02, sketch.asset
    assert total < 200_000


def test_csv_lists_every_sketch_once_with_a_subject():
    rows = read_csv()
    assert list(rows[0]) == COLUMNS
    assert [row["asset"] for row in rows] == [s.asset for s in SKETCHES]
    for row in rows:
        assert row["image"] == f"data/sketches/{row['asset']}.png", row
        assert (SPECS / row["image"]).is_file(), row["image"]
        subject = row["subject"]
        # goes into a template such as "a finished game asset of {subject}, painted, detailed"
        assert subject and subject == subject.strip() and not set("{}\n") & set(subject), row
