"""CLIP on the generator (`qc.clip_on_generator`): the generator measures right after rendering, QC
grades the numbers without loading CLIP, and the verdicts are those QC reaches running CLIP itself.

The tiny SDXL renders on the CPU and the tiny open_clip model (random weights, so the cosines mean
nothing) measures; thresholds are placed between the measured numbers so that CLIP decides
different images differently. Both places run CLIP with one torch thread: the generator's
(`compute.cpu_threads`) and QC's (`qc.clip_threads`).
"""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError
from skimage import data as skdata

from app.catalog.store import CatalogStore
from app.expand import ExpandRows, ResolvedModels
from app.qc import QcSettings
from app.qc.clip import TINY_MODEL
from app.qc.clip_measures import CLIP_COLUMNS, measure_from_row
from app.spec import ComputeSpec, load_spec, parse_spec
from app.stages import QualityControl
from app.storage import OutputStore

PROMPTS = ["a red leather boot", "a blue canvas tote", "a white coffee mug", "a green wool scarf"]
CONCEPTS = ("watermark", "text")


@pytest.fixture(scope="module")
def models(tiny_base, tiny_loras, model_catalog):
    return ResolvedModels.single(tiny_base, loras=dict(tiny_loras), known_loras=tuple(model_catalog.names("lora")))


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("style-default")
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def measuring(models, reference_folder):
    """The generator stage with CLIP, and QC settings naming the same model and concepts."""
    from app.qc.clip_stage import GeneratorWithClip

    settings = QcSettings(
        clip_model=TINY_MODEL,
        clip_device="cpu",
        clip_threads=1,
        clip_batch_size=4,
        negative_concepts=CONCEPTS,
        style_references={"default": str(reference_folder)},
        clip_on_generator=True,
    )
    compute = ComputeSpec(device="cpu", cpu_threads=1, batch_size=4)
    return GeneratorWithClip(models.bases["tiny-sdxl"], models.loras, compute, qc=settings), settings


@pytest.fixture(scope="module")
def rendered(measuring, models):
    """One batch of four: as the plain generator leaves it, and with the CLIP columns added."""
    stage, _ = measuring
    spec = parse_spec(
        {
            "run_name": "t",
            "input": {"path": "/x.parquet"},
            "size": "tiny-square",
            "steps": 2,
            "variations": {"seeds_per_row": 1, "seed_mode": "fixed", "base_seed": 5},
        }
    )
    expanded = ExpandRows(spec, models)(pa.Table.from_pylist([{"prompt": p} for p in PROMPTS]))
    batch = {k: np.asarray(v, dtype=object) for k, v in expanded.to_pydict().items()}
    plain = stage.generator(batch)
    return plain, stage.clip(plain)


def thresholds_between(settings: QcSettings, measured: dict) -> QcSettings:
    """`settings` with every CLIP bound placed between the batch's own numbers: the lowest
    prompt score is rejected, the middle two are borderline, the highest passes; the strongest
    concept similarity rejects; the farthest image from the style is off-style."""
    from app.qc.models import QcModels

    measures = [measure_from_row(measured, i) for i in range(len(measured["image_id"]))]
    scores = sorted(m.prompt_cosine for m in measures)
    concept = sorted(max(m.concept_cosines.values()) for m in measures)
    (style,) = QcModels.load(settings, clip_on_generator=True).styles.values()
    distances = sorted(float(style.distances(m.embedding[None], m.model_id)[0]) for m in measures)
    assert len(set(scores)) == len(set(distances)) == 4, "four distinct renders"
    return QcSettings(
        **{
            **settings.model_dump(),
            "min_clip_score": (scores[0] + scores[1]) / 2,
            "review_clip_score": (scores[2] + scores[3]) / 2,
            "max_negative_similarity": (concept[-2] + concept[-1]) / 2,
            "negative_margin": -2.0,
            "max_style_distance": (distances[-2] + distances[-1]) / 2,
            "review_style_distance": (distances[-2] + distances[-1]) / 2,
        }
    )


def verdicts(out: dict) -> list[tuple]:
    return [
        (str(out["status"][i]), str(out["error"][i]), out["reasons"][i], out["scores"][i])
        for i in range(len(out["image_id"]))
    ]


# --- the stages, without Ray -----------------------------------------------------------------------


def test_generator_adds_clip_measures_of_its_own_pixels(measuring, rendered):
    stage, settings = measuring
    plain, measured = rendered
    assert set(CLIP_COLUMNS) <= set(measured) and set(CLIP_COLUMNS) <= set(stage.adds)
    assert list(measured["pixels"]) == list(plain["pixels"])  # measuring leaves the render alone
    from app.stages import image_from_row

    expected = stage.clip.scorer.embed_images([image_from_row(plain, i) for i in range(4)])  # [4, 32]
    for i in range(4):
        measure = measure_from_row(measured, i)
        assert measure.model_id == settings.clip_model_id == "imagefab-tiny-clip/random-0"
        np.testing.assert_array_equal(measure.embedding, expected[i])
        assert set(measure.concept_cosines) == set(CONCEPTS) and -1 <= measure.prompt_cosine <= 1
        # CLIP's time is the generator's device time
        assert measured["gpu_seconds"][i] > plain["gpu_seconds"][i]


def test_verdicts_are_the_same_whichever_side_ran_clip(measuring, rendered):
    _, settings = measuring
    plain, measured = rendered
    settings = thresholds_between(settings, measured)
    on_generator = QualityControl(settings, clip_on_generator=True)
    assert on_generator.models.clip is None  # the style references were embedded, then CLIP let go
    in_qc = QualityControl(settings)
    assert in_qc.models.clip is not None

    graded = on_generator(measured)
    assert verdicts(graded) == verdicts(in_qc(plain))

    # ... and CLIP decided them differently: one off-prompt, two borderline, one off-style, a concept
    reasons = [json.loads(r) for r in graded["reasons"]]
    assert sum("off_prompt" in r for r in reasons) == 1
    assert sum("borderline_off_prompt" in r for r in reasons) == 2
    assert sum("off_style" in r for r in reasons) == 1
    assert sum(any(x.startswith("negative_concept:") for x in r) for r in reasons) == 1
    scores = [json.loads(s) for s in graded["scores"]]
    assert all(s["clip_score"] is not None and s["style_distance"] is not None for s in scores)


def test_qc_grades_the_numbers_it_is_given_and_refuses_missing_or_foreign_ones(measuring, rendered):
    _, settings = measuring
    _, measured = rendered
    settings = thresholds_between(settings, measured)
    batch = {k: np.array(v, dtype=v.dtype, copy=True) for k, v in measured.items()}
    cosines = json.loads(batch["clip_cosines"][0])
    batch["clip_cosines"][0] = json.dumps({**cosines, "prompt": -0.875})  # far below every score
    batch["clip_embedding"][1] = b""  # no measure
    batch["clip_model"][2] = "ViT-B-32/laion2b_s34b_b79k"  # another model's numbers

    out = QualityControl(settings, clip_on_generator=True)(batch)
    assert json.loads(out["scores"][0])["clip_score"] == -0.875 and "off_prompt" in json.loads(out["reasons"][0])
    assert out["status"][1] == "failed" and "no CLIP measures" in out["error"][1]
    assert out["status"][2] == "failed" and "'ViT-B-32/laion2b_s34b_b79k'" in out["error"][2]
    assert "'imagefab-tiny-clip/random-0'" in out["error"][2]
    # the untouched row is graded as before
    expected = QualityControl(settings, clip_on_generator=True)(measured)
    assert verdicts(out)[3] == verdicts(expected)[3]


def test_where_clip_runs_is_a_runtime_setting():
    auto = QcSettings(clip_model=TINY_MODEL)
    assert auto.clip_on_generator == "auto"
    assert auto.clip_runs_on_generator(generator_on_cuda=True)
    assert not auto.clip_runs_on_generator(generator_on_cuda=False)
    forced = QcSettings(clip_model=TINY_MODEL, clip_on_generator=True)
    assert forced.clip_runs_on_generator(generator_on_cuda=False)
    assert not QcSettings(clip_model=TINY_MODEL, clip_on_generator=False).clip_runs_on_generator(True)
    assert not QcSettings().clip_runs_on_generator(generator_on_cuda=True)  # no CLIP at all
    # where CLIP runs does not change what a verdict means
    assert forced.qc_version == auto.qc_version
    with pytest.raises(ValidationError, match="clip_on_generator.*clip_model"):
        QcSettings(clip_on_generator=True)
    with pytest.raises(ValidationError, match="clip_on_generator"):
        QcSettings(clip_model=TINY_MODEL, clip_on_generator="sometimes")


def test_serve_replica_measures_and_the_ingress_grades_the_same(measuring, models, tmp_path):
    from app.qc.clip_stage import ClipMeasurer
    from app.serve.config import ServeConfig
    from app.serve.core import ImageJob, ServeCore, rendered_rows

    stage, settings = measuring
    qc = settings.model_copy(update={"min_clip_score": -0.2, "review_clip_score": 0.0, "style_references": {}})
    # A replica's own CLIP, fresh like the ingress's: a text's embedding differs in its last bits
    # with the other new texts it is first embedded with, so both sides start from an empty cache.
    replica_clip = ClipMeasurer(qc, "cpu")
    cores = {
        where: ServeCore(
            ServeConfig(qc=qc, steps=2, output_uri=str(tmp_path / where)),
            models,
            clip_on_generator=where == "generator",
        )
        for where in ("generator", "qc")
    }
    requests = cores["qc"].plan(ImageJob(prompt="a red leather boot", n=3, seed=11))
    results = stage.generator.render(requests)
    accelerator = stage.generator.accelerator_settings
    served = {
        "generator": cores["generator"].finish(requests, rendered_rows(requests, results, accelerator, replica_clip)),
        "qc": cores["qc"].finish(requests, rendered_rows(requests, results, accelerator)),
    }
    assert cores["generator"].qc.models.clip is None
    for on_generator, in_qc in zip(served["generator"], served["qc"]):
        assert (on_generator.status, on_generator.reasons, on_generator.scores) == (
            in_qc.status,
            in_qc.reasons,
            in_qc.scores,
        )
        assert not math.isnan(on_generator.scores["clip_score"])


# --- the bulk job on a local Ray ---------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow  # two runs of the bulk job: ~30 s on 2 CPUs
def test_bulk_job_catalogues_the_same_scores_and_verdicts(ray_local, tmp_path):
    from jobs.generate import run

    (tmp_path / "rows.csv").write_text("key,prompt\n" + "".join(f"k{i},{p}\n" for i, p in enumerate(PROMPTS)))
    (tmp_path / "job.yaml").write_text(
        textwrap.dedent(f"""\
        run_name: clip-where
        input: {{path: rows.csv, prompt_column: prompt, key_column: key}}
        variations: {{seeds_per_row: 1, seed_mode: fixed, base_seed: 3}}
        size: tiny-square
        steps: 2
        compute: {{device: cpu, cpu_threads: 1, batch_size: 4}}
        qc: {{clip_model: {TINY_MODEL}, clip_threads: 1, review_clip_score: 1.0,
             negative_concepts: [watermark, text], enabled: [sharpness, prompt, negative_concepts]}}
    """)
    )
    rows = {}
    # On the generator, QC is told to put its own CLIP on CUDA: where there is none, that would
    # fail the run, so a run that passes never built a CLIP in QC.
    for where, qc in (
        ("generator", {"clip_on_generator": True, "clip_device": "cuda"}),
        ("qc", {"clip_on_generator": False, "clip_device": "cpu"}),
    ):
        out = tmp_path / where
        spec = load_spec(tmp_path / "job.yaml", {"output.uri": str(out), **{f"qc.{k}": v for k, v in qc.items()}})
        summary = run(spec, quiet=True)
        assert summary.rendered == 4 and summary.counts["failed"] == 0
        rows[where] = {r["image_id"]: r for r in CatalogStore(OutputStore.at(str(out))).read().to_pylist()}
    assert rows["generator"].keys() == rows["qc"].keys()
    for image_id, row in rows["generator"].items():
        other = rows["qc"][image_id]
        assert row["pixel_sha256"] == other["pixel_sha256"]
        assert row["clip_score"] is not None and row["clip_score"] == other["clip_score"]
        assert (row["status"], row["reasons"], row["qc_version"]) == (
            other["status"],
            other["reasons"],
            other["qc_version"],
        )
        assert dict(row["qc_scores"]) == dict(other["qc_scores"])
        assert "borderline_off_prompt" in row["reasons"]
