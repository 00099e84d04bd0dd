"""The CPU stages on image-conditioned rows, without Ray: QC reads the generator's `cond_*` measures,
the catalog's `conditioning` struct holds the request's input and those measures, failed rows keep
what they named, older catalogs read the column as null, and the run summary reports the
kept-region figure."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pytest
from photos import photo

from app.catalog.schema import CATALOG_SCHEMA, conform
from app.catalog.store import CatalogStore
from app.conditioning.measures import MEASURE_COLUMNS, Measures
from app.metadata import parse_infotext, read_metadata
from app.postprocess import PostprocessSettings
from app.qc import QcSettings
from app.request import Conditioning, RenderRequest, requests_to_numpy
from app.stages import CatalogWrite, Postprocess, QualityControl
from app.storage import OutputStore
from jobs.summary import RunSummary

QC = QcSettings(enabled=("sharpness", "contrast", "exposure", "blank", "kept_region", "seam", "upscale_drift"))
SHA = "e" * 64


def request(i: int, cond: Conditioning | None) -> RenderRequest:
    return RenderRequest(
        image_id=f"{i:032x}",
        prompt="a cup on a marble table",
        negative_prompt="",
        base_model={"name": "tiny-sdxl", "version": "1", "sha256": "0" * 64, "source": ""},
        loras=(),
        scheduler="euler",
        steps=4,
        guidance=5.0,
        width=128,
        height=96,
        seed=7 + i,
        conditioning=cond,
    )


INPAINT = Conditioning(
    mode="inpaint",
    image_uri="/data/cup.png",
    image_sha256=SHA,
    mask_uri="/data/cup_mask.png",
    mask_sha256="f" * 64,
    mask_source="mask",
    strength=1.0,
    mask_blur=4,
    blend_px=4,
    source_width=128,
    source_height=96,
)
UPSCALE = replace(INPAINT, mode="upscale", mask_uri="", mask_sha256="", mask_source="", strength=0.3, scale=2.0)
MEASURES = [
    Measures(kept_mean_abs=0.0, kept_max_abs=0.0, kept_pixels=4000, seam=1.1, seam_input=2.0),  # kept, no seam
    Measures(kept_mean_abs=3.5, kept_max_abs=90.0, kept_pixels=4000, seam=1.1, seam_input=2.0),  # redrawn
    Measures(tile_seam=1.0, source_difference=25.0),  # upscale that drifted
    Measures(),  # txt2img: nothing measured
]


def batch() -> dict:
    reqs = [request(0, INPAINT), request(1, INPAINT), request(2, UPSCALE), request(3, None)]
    pixels = np.ascontiguousarray(photo("astronaut", 128)[:96, :128])
    columns: dict[str, list] = {c: [] for c in MEASURE_COLUMNS}
    for m in MEASURES:
        for c, v in m.as_columns().items():
            columns[c].append(v)
    return {
        "image_id": np.array([r.image_id for r in reqs], dtype=object),
        "status": np.array(["pending"] * 4, dtype=object),
        "error": np.array([""] * 4, dtype=object),
        "request": requests_to_numpy(reqs),
        "pixels": np.array([pixels.tobytes()] * 4, dtype=object),
        "nonfinite": np.zeros(4),
        "gpu_seconds": np.full(4, 0.5),
        **{c: np.array(v, dtype=np.float64) for c, v in columns.items()},
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    output = OutputStore.at(str(tmp_path_factory.mktemp("out")))
    qc = QualityControl(QC)(batch())
    post = Postprocess(PostprocessSettings(presets=[]), output)(qc)
    summary = CatalogWrite(output, "run-1", date="2026-01-01")(post)
    rows = {r["image_id"]: r for r in CatalogStore(output).read().to_pylist()}
    return output, qc, summary, [rows[f"{i:032x}"] for i in range(4)]


def test_qc_judges_the_generators_measures(written):
    _, qc, _, _ = written
    assert list(qc["status"]) == ["accepted", "rejected", "rejected", "accepted"]
    assert json.loads(qc["reasons"][1]) == ["subject_changed"]
    assert json.loads(qc["reasons"][2]) == ["upscale_drift"]


def test_the_catalog_records_the_input_and_its_measures(written):
    _, _, _, rows = written
    kept, redrawn, upscaled, txt2img = rows
    assert kept["conditioning"] == {**asdict(INPAINT), **asdict(MEASURES[0])}
    assert redrawn["conditioning"]["kept_mean_abs"] == 3.5 and redrawn["reasons"] == ["subject_changed"]
    assert upscaled["conditioning"]["source_difference"] == 25.0
    assert upscaled["conditioning"]["kept_mean_abs"] is None  # NaN from the generator: not measured
    assert txt2img["conditioning"] is None
    scores = dict(kept["qc_scores"])
    assert scores["kept_mean_abs"] == 0.0 and scores["seam"] == 1.1 and scores["seam_input"] == 2.0
    assert "source_difference" in dict(upscaled["qc_scores"]) and "kept_mean_abs" not in dict(txt2img["qc_scores"])


def test_the_file_says_what_it_was_made_from(written):
    output, _, _, rows = written
    found = read_metadata(output.read_bytes(output.rel_of(rows[0]["uri"])))
    assert found["imagefab"]["conditioning"]["image_sha256"] == SHA
    assert found["imagefab"]["conditioning"]["mask_uri"] == "/data/cup_mask.png"
    assert parse_infotext(found["parameters"])["mask_blur"] == 4


def test_a_failed_bad_input_row_keeps_what_it_named(tmp_path):
    output = OutputStore.at(str(tmp_path))
    partial = Conditioning(mode="inpaint", image_uri="missing.png", image_sha256="", mask_uri="m.png")
    failed = {
        "image_id": np.array(["f" * 32], dtype=object),
        "status": np.array(["failed"], dtype=object),
        "error": np.array(["bad_input: image_missing: missing.png"], dtype=object),
        "combination": np.array([""], dtype=object),
        "request": requests_to_numpy([request(9, partial)]),
    }
    out = CatalogWrite(output, "run-1", date="2026-01-01")(failed)
    [row] = CatalogStore(output).read().to_pylist()
    assert row["status"] == "failed" and row["conditioning"]["image_uri"] == "missing.png"
    assert row["conditioning"]["mask_uri"] == "m.png" and row["conditioning"]["kept_mean_abs"] is None
    summary = RunSummary("run-1", "t", str(tmp_path))
    summary.add_failed(out)
    assert summary.counts["failed"] == 1 and summary.by_mode == {"inpaint": {"images": 1, "failed": 1}}


def test_an_older_catalog_reads_the_column_as_null():
    old = pa.table({"image_id": ["a"], "status": ["accepted"]})
    table = conform(old)
    assert table.schema.field("conditioning").type == CATALOG_SCHEMA.field("conditioning").type
    assert table.column("conditioning").to_pylist() == [None]


def test_the_catalog_struct_is_the_request_and_its_measures():
    names = CATALOG_SCHEMA.field("conditioning").type
    assert [f.name for f in names] == list(asdict(INPAINT)) + list(Measures.__dataclass_fields__)


def test_the_summary_reports_the_kept_region_and_modes(written):
    _, _, out, _ = written
    assert list(out["mode"]) == ["inpaint", "inpaint", "upscale", "txt2img"]
    assert out["kept_mean_abs"][0] == 0.0 and out["kept_mean_abs"][1] == 3.5 and math.isnan(out["kept_mean_abs"][2])
    summary = RunSummary("run-1", "t", "/out")
    summary.add_batch({**out, "generator_id": np.array([""] * 4, dtype=object)})
    kept = summary.to_dict()["kept_region"]
    assert kept == {
        "images": 2,
        "max_mean_abs": 3.5,
        "mean_mean_abs": 1.75,
        "max_mean_abs_unit": 3.5 / 255,
        "mean_mean_abs_unit": 1.75 / 255,
    }
    assert summary.by_mode["inpaint"] == {"images": 2, "accepted": 1, "rejected": 1}
    text = summary.render()
    assert "mode          upscale: 1 images, accepted 0, review 0, rejected 1, failed 0" in text
    assert "kept region   mean |output - input| outside the blend band over 2 inpainted/outpainted images: " in text
    assert "max 3.500/255 (0.01373), mean 1.750/255 (0.00686)" in text
    plain = RunSummary("run-2", "t", "/out")
    plain.add_batch({**out, "mode": np.array(["txt2img"] * 4, dtype=object), "kept_mean_abs": np.full(4, math.nan)})
    assert "mode " not in plain.render() and plain.to_dict()["kept_region"] is None


def test_images_kept_from_one_input_are_not_duplicates_of_each_other():
    """Two scenes of one product share its pixels by design; the same pixels from another input,
    or a txt2img image, are still duplicates."""
    from app.qc.duplicates import PhashIndex

    qc_settings = QcSettings(enabled=("duplicates",))
    b = batch()
    b["request"] = requests_to_numpy(
        [
            request(0, INPAINT),
            request(1, replace(INPAINT, target="")),  # the same input: a sibling
            request(2, replace(INPAINT, image_sha256="d" * 64)),  # another input, the same pixels
            request(3, None),
        ]
    )
    out = QualityControl(qc_settings, duplicates=PhashIndex())(b)
    reasons = [json.loads(r) for r in out["reasons"]]
    assert not any("duplicate" in x for x in reasons[1])  # the sibling of image 0
    assert any("duplicate" in x for x in reasons[2]) and any("duplicate" in x for x in reasons[3])
