"""Prompt adherence: the tiny open_clip model's mechanics, and the thresholds on known embeddings.

The shipped tiny config has random (seeded) weights, so its cosines mean nothing; these tests
check shapes, normalisation, determinism, caching and error handling on the real model, and
the off-prompt / negative-concept rules on cosines chosen by hand.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data as skdata

from app.qc import QcModels, QcSettings, evaluate, evaluate_batch
from app.qc.clip import TINY_MODEL, ClipScorer, ClipWeightsUnavailable
from app.qc.clip_measures import ClipMeasure, cosine, similarities

ASTRONAUT = skdata.astronaut()
COFFEE = skdata.coffee()


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer(TINY_MODEL, None, device="cpu", seed=0, batch_size=2, text_cache_size=3)


# --- the real (tiny) model -------------------------------------------------------------------------


def test_image_embeddings_are_unit_rows_and_batches_do_not_change_them(scorer: ClipScorer) -> None:
    gray = skdata.camera()
    rgba = np.dstack([ASTRONAUT, np.full(ASTRONAUT.shape[:2], 255, np.uint8)])
    embeddings = scorer.embed_images([ASTRONAUT, COFFEE, gray, rgba, ASTRONAUT])  # 3 batches of <= 2
    assert embeddings.shape == (5, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    assert cosine(embeddings[0], embeddings[4]) == pytest.approx(1.0, abs=1e-6)  # same image
    assert cosine(embeddings[0], embeddings[3]) == pytest.approx(1.0, abs=1e-6)  # opaque RGBA = RGB
    np.testing.assert_allclose(scorer.embed_images([COFFEE])[0], embeddings[1], atol=1e-6)
    assert scorer.embed_images([]).shape == (0, 32)


def test_same_seed_same_weights_other_seed_other_weights(scorer: ClipScorer) -> None:
    again = ClipScorer(TINY_MODEL, None, device="cpu", seed=0)
    other = ClipScorer(TINY_MODEL, None, device="cpu", seed=1)
    np.testing.assert_array_equal(again.embed_images([COFFEE]), scorer.embed_images([COFFEE]))
    np.testing.assert_array_equal(again.embed_texts(["a cup of coffee"]), scorer.embed_texts(["a cup of coffee"]))
    assert not np.allclose(other.embed_images([COFFEE]), scorer.embed_images([COFFEE]))
    assert scorer.model_id == "imagefab-tiny-clip/random-0" and other.model_id.endswith("random-1")


def test_global_torch_rng_is_left_alone() -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ClipScorer(TINY_MODEL, None, device="cpu", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_text_embeddings_are_cached_lru() -> None:
    scorer = ClipScorer(TINY_MODEL, None, device="cpu", text_cache_size=3)
    first = scorer.embed_texts(["red apple", "green pear", "red apple"])
    assert first.shape == (3, 32)
    np.testing.assert_array_equal(first[0], first[2])
    assert scorer.cached_texts == 2
    scorer.embed_texts(["blue plum", "yellow lemon"])  # 4 texts, room for 3: the least recent goes
    assert set(scorer._text_cache) == {"red apple", "blue plum", "yellow lemon"}
    scorer.embed_texts(["blue plum", "green pear"])
    assert set(scorer._text_cache) == {"yellow lemon", "blue plum", "green pear"}
    np.testing.assert_allclose(scorer.embed_texts(["red apple"])[0], first[0], atol=1e-6)  # recomputed, same


def test_cosine_and_similarities_shapes() -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0]])
    b = np.array([[6.0, 8.0], [0.0, 2.0]])
    np.testing.assert_allclose(cosine(a, b), [1.0, 0.0])
    np.testing.assert_allclose(cosine(a, np.array([0.0, 1.0])), [0.8, 0.0])
    assert cosine(np.array([1.0, 0.0]), np.array([-2.0, 0.0])) == pytest.approx(-1.0)
    assert similarities(a, b).shape == (2, 2)
    with pytest.raises(ValueError, match="row counts"):
        cosine(a, b[:1].repeat(3, axis=0))
    with pytest.raises(ValueError, match="size"):
        cosine(a, np.ones(3))


def test_missing_weights_fail_fast_naming_the_tag() -> None:
    start = time.perf_counter()
    with pytest.raises(ClipWeightsUnavailable, match=r"'ViT-B-32'.*'laion2b_s34b_b79k'") as error:
        ClipScorer("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - start < 10  # no download attempt, no hang
    assert "clip_pretrained" in str(error.value)


def test_unknown_model_tag_and_device_name_the_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="'ViT-Nope'"):
        ClipScorer("ViT-Nope")
    with pytest.raises(ValueError, match=r"'not-a-tag'.*laion2b_s34b_b79k"):
        ClipScorer("ViT-B-32", "not-a-tag")
    with pytest.raises(ValueError, match="device"):
        ClipScorer(TINY_MODEL, device="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        ClipScorer(TINY_MODEL, batch_size=0)


def test_checkpoint_file_round_trip(scorer: ClipScorer, tmp_path) -> None:
    import torch

    path = tmp_path / "tiny.pt"
    torch.save(scorer.model.state_dict(), path)
    loaded = ClipScorer(TINY_MODEL, str(path), device="cpu", seed=99)  # the seed no longer matters
    np.testing.assert_allclose(loaded.embed_images([COFFEE]), scorer.embed_images([COFFEE]), atol=1e-6)
    assert loaded.model_id == f"{TINY_MODEL}/{path}"


def test_clip_score_is_recorded_without_thresholds(scorer: ClipScorer) -> None:
    settings = QcSettings(clip_model=TINY_MODEL)
    models = QcModels(settings, clip=scorer)
    verdict, no_prompt = models.evaluate_batch([ASTRONAUT, ASTRONAUT], ["an astronaut", None])
    assert -1.0 <= verdict.scores["clip_score"] <= 1.0
    assert verdict.status == "accepted"  # no thresholds: the score judges nothing
    assert math.isnan(no_prompt.scores["clip_score"])
    expected = cosine(scorer.embed_images([ASTRONAUT])[0], scorer.embed_texts(["an astronaut"])[0])
    assert verdict.scores["clip_score"] == pytest.approx(expected, abs=1e-6)


def test_qc_models_load_builds_the_scorer_from_settings() -> None:
    settings = QcSettings(clip_model=TINY_MODEL, clip_device="cpu", clip_seed=0, clip_batch_size=4)
    models = QcModels.load(settings)
    assert models.clip is not None and models.clip.model_id == "imagefab-tiny-clip/random-0"
    verdicts = models.evaluate_batch([ASTRONAUT, COFFEE], ["an astronaut", "coffee"])
    assert all(not math.isnan(v.scores["clip_score"]) for v in verdicts)
    assert QcModels.load(QcSettings()).clip is None


# --- thresholds on cosines chosen by hand -------------------------------------------------------------


def measured(settings: QcSettings, prompt_cosine: float, **concept_cosines: float) -> ClipMeasure:
    """One image's CLIP numbers, chosen by hand, as if the model `settings` name had measured them."""
    return ClipMeasure(
        model_id=settings.clip_model_id,
        embedding=np.array([1.0, 0.0, 0.0], np.float32),
        prompt_cosine=prompt_cosine,
        concept_cosines={concept.replace("_", " "): cos for concept, cos in concept_cosines.items()},
    )


@pytest.mark.parametrize(
    ("score", "reasons"),
    [(0.30, ()), (0.22, ("borderline_off_prompt",)), (0.10, ("off_prompt",))],
)
def test_prompt_thresholds(score: float, reasons: tuple[str, ...]) -> None:
    settings = QcSettings(clip_model=TINY_MODEL, min_clip_score=0.18, review_clip_score=0.25)
    verdict = evaluate(ASTRONAUT, "a prompt", settings, clip_measure=measured(settings, score))
    assert verdict.reasons == reasons
    assert verdict.scores["clip_score"] == pytest.approx(score, abs=1e-6)


def test_negative_concepts() -> None:
    settings = QcSettings(
        clip_model=TINY_MODEL,
        negative_concepts=("watermark", "text", "extra fingers"),
        max_negative_similarity=0.25,
        negative_margin=0.02,
    )
    concepts = dict(
        watermark=0.35,  # above the bound and above the prompt + margin
        text=0.40,  # as strong, but the second prompt asks for text
        extra_fingers=0.29,  # above the bound, not above the prompt + margin
    )
    at_prompt = measured(settings, 0.28, **concepts)
    portrait, poster = evaluate_batch(
        [ASTRONAUT, ASTRONAUT], ["a portrait", "a poster with text"], settings, clip_measures=[at_prompt, at_prompt]
    )
    assert portrait.status == "rejected"
    assert portrait.reasons == ("negative_concept:watermark", "negative_concept:text")
    assert portrait.scores["negative_similarity"] == pytest.approx(0.40, abs=1e-6)
    assert poster.reasons == ("negative_concept:watermark",)
    assert poster.scores["negative_similarity"] == pytest.approx(0.35, abs=1e-6)

    # without a prompt only the bound applies
    (no_prompt,) = evaluate_batch(
        [ASTRONAUT], [None], settings, clip_measures=[measured(settings, math.nan, **concepts)]
    )
    assert set(no_prompt.reasons) == {f"negative_concept:{c}" for c in settings.negative_concepts}
    # disabled: measured, not judged
    quiet = settings.model_copy(update={"enabled": ("sharpness",)})
    assert evaluate(ASTRONAUT, "a portrait", quiet, clip_measure=measured(quiet, 0.28, **concepts)).reasons == ()


# --- settings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"min_clip_score": 0.2}, ["min_clip_score", "clip_model"]),
        ({"negative_concepts": ("text",)}, ["negative_concepts", "clip_model"]),
        (
            {"clip_model": TINY_MODEL, "min_clip_score": 0.3, "review_clip_score": 0.2},
            ["review_clip_score", "0.2", "0.3"],
        ),
        ({"clip_model": TINY_MODEL, "negative_concepts": ("text", " ")}, ["negative_concepts"]),
        ({"clip_model": TINY_MODEL, "negative_concepts": ("text", "text")}, ["more than once"]),
        ({"clip_device": "tpu"}, ["clip_device"]),
        ({"clip_threads": 0}, ["clip_threads"]),
    ],
)
def test_clip_settings_name_fields_and_values(fields: dict, names: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        QcSettings(**fields)
    for name in names:
        assert name in str(error.value)


def test_qc_version_covers_the_model_but_not_where_it_runs() -> None:
    base = QcSettings(clip_model=TINY_MODEL)
    assert base.qc_version != QcSettings().qc_version
    assert QcSettings(clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k").qc_version != base.qc_version
    assert QcSettings(clip_model=TINY_MODEL, negative_concepts=("text",)).qc_version != base.qc_version
    same = QcSettings(clip_model=TINY_MODEL, clip_device="cpu", clip_threads=1, clip_batch_size=4)
    assert same.qc_version == base.qc_version


def test_importing_the_clip_module_is_what_pulls_in_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, app.qc, app.qc.models; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == "False"
