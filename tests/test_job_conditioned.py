"""Image-conditioned rows through the whole bulk job on a local Ray with the tiny model: one row per
mode and a row per kind of bad input, in one run. Every mode renders with its input recorded in the
catalog, inpainting and outpainting keep the input's pixels, bad inputs become failed rows with
their reason (or render, where normalising them makes them usable), the summary reports the
kept-region figure, and `regenerate` reproduces an image or refuses a changed input by name."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.catalog.store import CatalogStore
from app.metadata import parse_infotext, read_metadata
from app.regenerate import RegenerateError, regenerate
from app.spec import load_spec
from app.storage import OutputStore

pytestmark = pytest.mark.ray

PACKSHOTS = Path(__file__).resolve().parents[1] / "specs" / "data" / "packshots"
ROWS = """\
sku,product,image,mask,mode,target,width,height
inpaint-alpha,a silver coin,coin.png,,,,,
inpaint-mask,a red cup,coffee_cup.png,coffee_cup_mask.png,,,,
outpaint,a silver coin,coin.png,,outpaint,9:16,,
img2img,a silver coin,coin.png,,img2img,,128,128
upscale,a silver coin,coin.png,,upscale,,,
missing,a ghost,missing.png,,,,,
mask-size,a silver coin,coin.png,coffee_cup_mask.png,,,,
keeps-all,a silver coin,coin.png,black_mask.png,,,,
cmyk,a photo,cmyk.jpg,,img2img,,64,64
grey16,a photo,grey16.png,,img2img,,64,64
palette,a photo,palette.png,,img2img,,64,64
animated,a photo,animated.png,,img2img,,64,64
huge,a photo,huge.png,,img2img,,64,64
"""
RENDERED = ("inpaint-alpha", "inpaint-mask", "outpaint", "img2img", "upscale", "cmyk", "grey16", "palette")
FAILED = {
    "missing": "image_missing",
    "mask-size": "mask_size",
    "keeps-all": "mask_keeps_all",
    "animated": "image_animated",
    "huge": "image_pixels",
}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_inputs(folder: Path) -> None:
    for name in ("coin.png", "coffee_cup.png", "coffee_cup_mask.png"):
        shutil.copy(PACKSHOTS / name, folder / name)
    coin = Image.open(folder / "coin.png")
    Image.new("L", coin.size, 0).save(folder / "black_mask.png")  # black: keep every pixel
    photo = Image.open(folder / "coffee_cup.png").convert("RGB").resize((96, 96))
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    wide = (np.arange(96 * 96, dtype=np.uint32).reshape(96, 96) * 7).astype(np.uint16)
    Image.fromarray(wide).save(folder / "grey16.png")
    photo.convert("P").save(folder / "palette.png")
    frames = [photo, photo.rotate(90)]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:], duration=100)
    (folder / "huge.png").write_bytes(png_header_only(20_000, 20_000))


@pytest.fixture(scope="module")
def job(ray_local, tmp_path_factory):
    from jobs.generate import run

    folder = tmp_path_factory.mktemp("conditioned")
    write_inputs(folder)
    (folder / "rows.csv").write_text(ROWS)
    (folder / "job.yaml").write_text(
        textwrap.dedent("""\
        run_name: conditioned-job
        input: {path: rows.csv, prompt_template: "{product} on a marble table", key_column: sku}
        tags: [sku]
        model: {base: tiny-sdxl}
        size: tiny-square
        steps: 4
        image: {mode: inpaint, scale: 1.5, tile: 64, tile_overlap: 16}
        postprocess: {presets: [thumbnail], format: png}
        compute: {batch_size: 2}
    """)
    )
    output = tmp_path_factory.mktemp("out")
    summary = run(load_spec(folder / "job.yaml", {"output.uri": str(output)}), quiet=True)
    rows = {dict(r["tags"])["sku"]: r for r in catalog(output)}
    return {"summary": summary, "rows": rows, "output": output, "inputs": folder}


def catalog(output) -> list[dict]:
    return CatalogStore(OutputStore.at(str(output))).read().to_pylist()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_mode_renders_with_its_input_recorded(job):
    rows, inputs = job["rows"], job["inputs"]
    assert set(rows) == set(RENDERED) | set(FAILED)
    for sku in RENDERED:
        row = rows[sku]
        assert row["status"] in ("accepted", "review", "rejected"), (sku, row["status"], row["error"])
        assert row["uri"] and row["pixel_sha256"]
    cond = {sku: rows[sku]["conditioning"] for sku in rows}
    assert [cond[s]["mode"] for s in RENDERED[:5]] == ["inpaint", "inpaint", "outpaint", "img2img", "upscale"]
    assert cond["inpaint-alpha"]["image_sha256"] == sha256(inputs / "coin.png")
    assert cond["inpaint-alpha"]["image_uri"] == str(inputs / "coin.png") and cond["inpaint-alpha"]["mask_uri"] == ""
    assert cond["inpaint-mask"]["mask_sha256"] == sha256(inputs / "coffee_cup_mask.png")
    assert cond["inpaint-mask"]["mask_source"] == "mask" and cond["inpaint-alpha"]["mask_source"] == "alpha"
    assert cond["outpaint"]["target"] == "9:16" and rows["outpaint"]["height"] > rows["outpaint"]["width"]
    assert (rows["img2img"]["width"], rows["img2img"]["height"]) == (128, 128)
    assert cond["upscale"]["tile"] == 64 and cond["upscale"]["scale"] == 1.5
    # The kept region is the input's (mean absolute difference outside the blend band ≤ 1/255)
    for sku in ("inpaint-alpha", "inpaint-mask", "outpaint"):
        assert cond[sku]["kept_mean_abs"] <= 1.0 and cond[sku]["kept_pixels"] > 1000, sku
        assert cond[sku]["seam"] is not None and cond[sku]["seam_input"] is not None
        assert "subject_changed" not in rows[sku]["reasons"]
        assert dict(rows[sku]["qc_scores"])["kept_mean_abs"] == cond[sku]["kept_mean_abs"]
    assert cond["upscale"]["tile_seam"] is not None and cond["upscale"]["source_difference"] is not None
    assert cond["img2img"]["kept_mean_abs"] is None and cond["img2img"]["seam"] is None


def test_inputs_that_normalise_render_and_their_conversions_do_not_crash(job):
    rows = job["rows"]
    for sku in ("cmyk", "grey16", "palette"):
        assert rows[sku]["conditioning"]["mode"] == "img2img" and rows[sku]["conditioning"]["image_sha256"]


def test_each_bad_input_is_a_failed_row_naming_its_reason_and_input(job):
    rows = job["rows"]
    for sku, reason in FAILED.items():
        row = rows[sku]
        assert row["status"] == "failed" and row["error"].startswith(f"bad_input: {reason}:"), (sku, row["error"])
        assert row["conditioning"]["image_uri"] == ROWS.split(f"\n{sku},", 1)[1].split(",")[1]
        assert row["conditioning"]["image_sha256"] == "" and row["conditioning"]["kept_mean_abs"] is None
        assert row["uri"] == ""


def test_the_file_carries_the_input_and_a1111_strength(job):
    row = job["rows"]["inpaint-mask"]
    output = OutputStore.at(str(job["output"]))
    found = read_metadata(output.read_bytes(output.rel_of(row["uri"])))
    assert found["imagefab"]["conditioning"]["mask_sha256"] == row["conditioning"]["mask_sha256"]
    params = parse_infotext(found["parameters"])
    assert params["denoising_strength"] == 1.0 and params["mask_blur"] == 4


def test_the_summary_reports_modes_and_the_kept_region(job):
    summary = job["summary"]
    assert summary.counts["failed"] == len(FAILED)
    assert summary.by_mode["inpaint"]["images"] == 5 and summary.by_mode["inpaint"]["failed"] == 3  # missing: inpaint
    assert summary.by_mode["img2img"]["images"] == 6 and summary.by_mode["upscale"]["images"] == 1
    kept = summary.kept_region
    assert kept["images"] == 3 and kept["max_mean_abs"] <= 1.0 and kept["max_mean_abs_unit"] <= 1 / 255
    assert "kept region   mean |output - input| outside the blend band over 3" in summary.render()
    stored = json.loads(OutputStore.at(str(job["output"])).read_bytes(f"runs/{summary.run_id}/summary.json"))
    assert stored["kept_region"] == kept and stored["by_mode"]["outpaint"]["images"] == 1


def test_regenerate_reproduces_an_inpainted_image_then_refuses_a_changed_input(job):
    row = job["rows"]["inpaint-mask"]
    report = regenerate(row["image_id"], str(job["output"]))
    assert report.identical and report.max_abs_diff == 0
    # The mask file is replaced by other bytes: the catalog's sha256 no longer matches, by name
    mask = job["inputs"] / "coffee_cup_mask.png"
    Image.open(mask).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mask)
    with pytest.raises(RegenerateError, match=rf"input_changed: the input mask {mask} changed"):
        regenerate(row["image_id"], str(job["output"]))
