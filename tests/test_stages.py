"""The stages alone, without Ray: generator, QC, post-processing, catalog append."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from app.catalog.store import CatalogStore
from app.expand import ExpandRows, ResolvedModels
from app.metadata import parse_infotext, read_metadata
from app.request import RenderRequest, requests_from_column
from app.spec import ComputeSpec, parse_spec
from app.stages import CatalogWrite, Postprocess, QualityControl
from app.storage import OutputStore


@pytest.fixture(scope="module")
def models(tiny_base, tiny_loras, model_catalog):
    return ResolvedModels.single(tiny_base, loras=dict(tiny_loras), known_loras=tuple(model_catalog.names("lora")))


@pytest.fixture(scope="module")
def generator(models):
    from app.generator import Generator

    return Generator(models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu", cpu_threads=1, batch_size=4))


def spec_for(**over):
    data = {
        "run_name": "t",
        "input": {"path": "/x.parquet"},
        "size": "tiny-square",
        "steps": 3,
        "variations": {"seeds_per_row": 1, "seed_mode": "fixed", "base_seed": 5},
        "postprocess": {"presets": ["thumbnail"], "format": "jpeg"},
    }
    data.update(over)
    return parse_spec(data)


def requests(models, prompts, **over):
    out = ExpandRows(spec_for(**over), models)(pa.Table.from_pylist([{"prompt": p} for p in prompts]))
    return requests_from_column(out["request"]), out.to_pydict()


def test_generator_is_deterministic_and_batch_invariant(generator, models):
    reqs, _ = requests(models, ["a red shoe", "a blue hat", "a green mug"])
    alone = generator.render(reqs[:1])[0]
    together = {r.image_id: r for r in generator.render(reqs)}
    assert alone.error == "" and alone.pixels.shape == (256, 256, 3) and alone.pixels.dtype == np.uint8
    assert np.array_equal(alone.pixels, together[reqs[0].image_id].pixels)
    assert together[reqs[0].image_id].batch_size == 1 and together[reqs[0].image_id].batch_id == reqs[0].image_id
    assert not np.array_equal(together[reqs[0].image_id].pixels, together[reqs[1].image_id].pixels)
    assert alone.gpu_seconds > 0


def test_lora_weight_zero_is_the_base_image_and_weight_changes_pixels(generator, models):
    base, _ = requests(models, ["a red shoe"])
    w0, _ = requests(models, ["a red shoe"], model={"loras": [{"name": "tiny-style", "weight": 0.0}]})
    w5, _ = requests(models, ["a red shoe"], model={"loras": [{"name": "tiny-style", "weight": 0.5}]})
    w9, _ = requests(models, ["a red shoe"], model={"loras": [{"name": "tiny-style", "weight": 0.9}]})
    px = {name: generator.render(r)[0].pixels for name, r in (("base", base), ("w0", w0), ("w5", w5), ("w9", w9))}
    assert np.array_equal(px["base"], px["w0"])
    assert not np.array_equal(px["w0"], px["w5"]) and not np.array_equal(px["w5"], px["w9"])
    # Back to no LoRA: the base image again, exactly (the adapter is disabled, not merged).
    assert np.array_equal(generator.render(base)[0].pixels, px["base"])
    assert generator.stats()["lora_switches"] >= 3


def test_batched_mode_is_reproduced_by_rendering_the_recorded_batch(models):
    from app.generator import Generator

    gen = Generator(
        models.bases["tiny-sdxl"], models.loras, ComputeSpec(device="cpu", batch_invariant=False, batch_size=3)
    )
    reqs, _ = requests(models, ["a", "b", "c"])
    first = {r.image_id: r for r in gen.render(reqs)}
    assert {r.batch_size for r in first.values()} == {3}
    again = {r.image_id: r for r in gen.render_batch_exactly(list(reversed(reqs)))}
    for image_id, r in first.items():
        assert np.array_equal(r.pixels, again[image_id].pixels)


def test_importing_the_generator_pulls_in_no_ray_mlflow_or_duckdb():
    # It also runs alone on a GPU machine for benchmarks, and Ray workers import it afresh.
    code = "import sys, app.generator; print(sorted({'ray', 'mlflow', 'duckdb'} & set(sys.modules)))"
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"


def test_unknown_lora_on_generator_fails_rows_not_the_actor(generator, models):
    reqs, _ = requests(models, ["x"], model={"loras": [{"name": "tiny-style", "weight": 1.0}]})
    bad = RenderRequest(
        **{
            **reqs[0].__dict__,
            "image_id": "f" * 32,
            "loras": (reqs[0].loras[0].__class__("ghost", "1", 1.0, "0" * 64),),
        }
    )
    results = {r.image_id: r for r in generator.render([bad, reqs[0]])}
    assert results["f" * 32].error.startswith("model_error:") and "ghost" in results["f" * 32].error
    assert results[reqs[0].image_id].error == ""


def batch_from(generator, models, prompts, **over):
    _, out = requests(models, prompts, **over)
    batch = {k: np.asarray(v, dtype=object) for k, v in out.items()}
    return generator(batch)


def test_qc_post_and_catalog_write_make_readable_rows(generator, models, tmp_path):
    batch = batch_from(generator, models, ["a red shoe", "a blue hat", "a green mug"])
    # The tiny model's images are sharp, mid-grey noise: accepted by the default QC. The third
    # image's pixels become one flat grey, which QC has to reject as blank.
    batch["pixels"][2] = np.full((256, 256, 3), 128, np.uint8).tobytes()
    spec = spec_for()
    output = OutputStore.at(str(tmp_path / "out"))
    qc = QualityControl(spec.qc)(batch)
    assert list(qc["status"]) == ["accepted", "accepted", "rejected"], list(qc["reasons"])
    assert [json.loads(r) for r in qc["reasons"][:2]] == [[], []] and "blank" in json.loads(qc["reasons"][2])
    assert json.loads(qc["scores"][0])["sharpness"] > spec.qc.review_sharpness
    post = Postprocess(spec.postprocess, output)(qc)
    assert "pixels" not in post
    summary = CatalogWrite(output, run_id="r1")(post)
    assert list(summary["image_id"]) == list(batch["image_id"])

    rows = CatalogStore(output).read().to_pylist()
    assert len(rows) == 3 and {r["run_id"] for r in rows} == {"r1"}
    by_id = {r["image_id"]: r for r in rows}
    assert [by_id[i]["status"] for i in batch["image_id"]] == ["accepted", "accepted", "rejected"]
    # Variants are made for accepted and review images only; the rejected one has its master alone.
    rejected = by_id[batch["image_id"][2]]
    assert rejected["variants"] == [] and rejected["uri"]
    row = next(r for r in rows if r["image_id"] == batch["image_id"][0])
    assert row["prompt"] == "a red shoe" and row["steps"] == 3 and row["width"] == 256
    assert row["base_model"]["name"] == "tiny-sdxl" and len(row["base_model"]["sha256"]) == 64
    assert row["accelerator"] == "cpu:threads=1" and row["gpu_seconds"] > 0 and row["cost_usd"] > 0
    # The master PNG holds the pixels whose sha256 the row records, and A1111-readable metadata.
    data = output.read_bytes(output.rel_of(row["uri"]))
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == row["pixel_sha256"]
    meta = read_metadata(data)
    info = parse_infotext(meta["parameters"])
    assert info["prompt"] == "a red shoe" and info["seed"] == row["seed"] and info["steps"] == 3
    assert info["sampler"] == "Euler" and info["image_id"] == row["image_id"]
    assert meta["digital_source_type"].endswith("trainedAlgorithmicMedia")
    (variant,) = row["variants"]
    assert variant["preset"] == "thumbnail" and variant["format"] == "jpeg"
    thumb = output.read_bytes(output.rel_of(variant["uri"]))
    assert Image.open(io.BytesIO(thumb)).size == (256, 256) and len(thumb) == variant["bytes"]


def test_nonfinite_output_is_rejected(generator, models):
    batch = batch_from(generator, models, ["a"])
    batch["nonfinite"] = np.array([0.25])
    out = QualityControl(spec_for().qc)(batch)
    assert out["status"][0] == "rejected" and "nonfinite_output" in json.loads(out["reasons"][0])


def test_a_row_that_breaks_postprocessing_fails_alone(generator, models, tmp_path):
    batch = QualityControl(spec_for().qc)(batch_from(generator, models, ["a", "b"]))
    batch["pixels"] = np.array([batch["pixels"][0][:100], batch["pixels"][1]], dtype=object)  # truncated bytes
    out = Postprocess(spec_for().postprocess, OutputStore.at(str(tmp_path)))(batch)
    assert out["status"][0] == "failed" and out["error"][0].startswith("postprocess_error:")
    assert out["status"][1] != "failed" and out["uri"][1]
