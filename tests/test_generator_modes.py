"""Image-conditioned modes on the tiny model, without Ray: rows with input images expand into
planned requests, and the generator renders each mode with the kept region byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from app.compute import ComputeSpec
from app.conditioning.loading import load_input_image
from app.expand import ExpandRows, ResolvedModels
from app.generator.generator import Generator
from app.request import requests_from_column
from app.spec import parse_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
COLUMNS = ("product", "image", "mask", "mode", "strength", "target")


@pytest.fixture(scope="module")
def generator(tiny_base):
    return Generator(tiny_base, {}, ComputeSpec(device="cpu", cpu_threads=1, batch_size=1))


def expand(tiny_base, rows: list[dict], base_dir: Path = SPECS, **image):
    spec = parse_spec(
        {
            "run_name": "modes",
            "input": {"path": "/rows.csv", "prompt_template": "{product} on a marble table"},
            "size": "tiny-square",
            "steps": 4,
            "image": {"mode": "inpaint", "tile": 64, "tile_overlap": 16, "base_dir": str(base_dir), **image},
        }
    )
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows])
    out = ExpandRows(spec, ResolvedModels.single(tiny_base))(table)
    return out.to_pydict(), requests_from_column(out["request"])


def test_every_mode_renders_and_inpainting_keeps_the_product(tiny_base, generator):
    rows = [
        {"product": "a coin", "image": "data/packshots/coin.png"},  # alpha is the mask
        {
            "product": "a cup",
            "image": "data/packshots/coffee_cup.png",
            "mask": "data/packshots/coffee_cup_mask.png",
        },
        {"product": "a cup", "image": "data/packshots/coffee_cup.png", "mode": "outpaint", "target": "9:16"},
        {"product": "a coin", "image": "data/packshots/coin.png", "mode": "img2img", "strength": 0.5},
        {"product": "a coin", "image": "data/packshots/coin.png", "mode": "upscale", "strength": 0.5},
    ]
    out, requests = expand(tiny_base, rows)
    assert out["status"] == ["pending"] * 5
    assert [r.mode for r in requests] == ["inpaint", "inpaint", "outpaint", "img2img", "upscale"]
    assert [(r.width, r.height) for r in requests] == [(150, 143), (218, 201), (224, 392), (256, 256), (304, 288)]
    coin = load_input_image(str(SPECS / "data/packshots/coin.png"))
    assert requests[0].conditioning.image_sha256 == coin.sha256
    assert requests[0].conditioning.mask_source == "alpha" and requests[1].conditioning.mask_source == "mask"

    results = {r.image_id: r for r in generator.render(requests)}
    for req in requests:
        res = results[req.image_id]
        assert not res.error, res.error
        assert res.pixels.shape == (req.height, req.width, 3)
    for req in requests[:3]:  # inpaint and outpaint: the kept region is the input's, outside the band
        m = results[req.image_id].measures
        assert m.kept_mean_abs <= 1.0 and m.kept_pixels > 1000
        assert m.seam is not None and m.seam_input is not None
    inpainted = results[requests[0].image_id].pixels
    kept = coin.alpha >= 250
    assert np.abs(inpainted[kept].astype(int) - coin.rgb[kept].astype(int)).mean() < 3  # band pixels mixed only
    up = results[requests[4].image_id].measures
    assert up.tile_seam is not None and up.source_difference is not None

    again = {r.image_id: r for r in generator.render(requests[:1])}
    assert np.array_equal(again[requests[0].image_id].pixels, inpainted)  # reproducible


def test_bad_inputs_fail_their_rows_and_a_changed_input_is_refused(tiny_base, generator, tmp_path):
    shutil.copy(SPECS / "data/packshots/coin.png", tmp_path / "coin.png")
    (tmp_path / "notes.png").write_text("not an image")
    rows = [
        {"product": "x", "image": "missing.png"},
        {"product": "x", "image": "notes.png"},
        {"product": "x", "image": "coin.png", "mask": str(SPECS / "data/packshots/coffee_cup_mask.png")},
        {"product": "x", "image": "coin.png", "mode": "sideways"},
        {"product": "x", "image": "coin.png", "mode": "img2img", "strength": 0.1},  # 0.1 x 4 steps: none
        {"product": "x", "image": "coin.png"},
    ]
    out, requests = expand(tiny_base, rows, base_dir=tmp_path)
    assert out["status"] == ["failed"] * 5 + ["pending"]
    errors = out["error"]
    assert errors[0].startswith("bad_input: image_missing:") and "missing.png" in errors[0]
    assert errors[1].startswith("bad_input: image_unreadable:") or errors[1].startswith("bad_input: image_format:")
    assert errors[2].startswith("bad_input: mask_size:")
    assert "mode 'sideways'" in errors[3]
    assert "no denoising step" in errors[4]
    assert requests[0].conditioning.image_uri == "missing.png"  # a failed row still names its input

    # The input changes after the request was made: the generator refuses it.
    (tmp_path / "coin.png").write_bytes((SPECS / "data/packshots/rocket.png").read_bytes())
    [result] = generator.render([requests[5]])
    assert result.pixels is None and result.error.startswith("bad_input: input_changed:")
