"""What CLIP says about an image, as numbers QC grades: measured where CLIP runs, graded in QC.

CLIP runs in one of two places (`QcSettings.clip_on_generator`): in the QC worker, or on the
generator's device right after rendering (`clip_stage.py`), which then hands the measures to QC in
three batch columns. Both places call `measure_clip`, so on the same device and with the same
images embedded together the numbers, and so the verdicts, are the same bits.

    clip_embedding   bytes: the image embedding, float32 [D], unit length (b"" for no measure)
    clip_model       the `ClipScorer.model_id` that made it, e.g. "ViT-B-32/laion2b_s34b_b79k"
    clip_cosines     JSON {"prompt": cosine or null, "concepts": {negative concept: cosine}}

QC checks `clip_model` against its own settings before it trusts a measure (a generator started
with other settings would otherwise be graded against the wrong thresholds). No torch here: QC
workers that never run CLIP never load it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CLIP_COLUMNS = ("clip_embedding", "clip_model", "clip_cosines")


def clip_model_id(model_name: str, pretrained: str | None, seed: int) -> str:
    """What produces an embedding: "ViT-B-32/laion2b_s34b_b79k", or "<model>/random-<seed>"."""
    return f"{model_name}/{pretrained or f'random-{seed}'}"


@dataclass(frozen=True, eq=False)
class ClipMeasure:
    """One image's CLIP numbers: all QC needs from the model."""

    model_id: str
    embedding: np.ndarray  # [D] float32, unit length; the style check compares it to references
    prompt_cosine: float  # cosine(image, prompt); NaN when the image has no prompt
    concept_cosines: Mapping[str, float]  # every negative concept -> cosine(image, concept)


def measure_clip(
    clip, images: Sequence[np.ndarray], prompts: Sequence[str | None], concepts: Sequence[str]
) -> list[ClipMeasure]:
    """Embed `images` (uint8 RGB arrays) in one pass with `clip` (a `ClipScorer`), and their
    cosines to their prompts and to every negative concept."""
    # image_embeddings: [N, D] unit rows
    image_embeddings = clip.embed_images(images)
    count = len(image_embeddings)

    # Prompt adherence: raw cosine to the image's own prompt
    prompt_cosines = np.full(count, math.nan)
    with_prompt = [k for k, prompt in enumerate(prompts) if prompt]
    if with_prompt:
        text_embeddings = clip.embed_texts([prompts[k] for k in with_prompt])  # [P, D]
        prompt_cosines[with_prompt] = np.atleast_1d(cosine(image_embeddings[with_prompt], text_embeddings))

    # Negative concepts: every concept against every image; which apply is QC's business
    concept_sims = (
        similarities(image_embeddings, clip.embed_texts(list(concepts)))  # [N, C]
        if concepts
        else np.zeros((count, 0))
    )
    return [
        ClipMeasure(
            model_id=clip.model_id,
            embedding=image_embeddings[k],
            prompt_cosine=float(prompt_cosines[k]),
            concept_cosines={concept: float(sim) for concept, sim in zip(concepts, concept_sims[k])},
        )
        for k in range(count)
    ]


def measure_columns(measure: ClipMeasure | None) -> dict:
    """The `CLIP_COLUMNS` values of one row (empty values for no measure)."""
    if measure is None:
        return {"clip_embedding": b"", "clip_model": "", "clip_cosines": ""}
    prompt = None if math.isnan(measure.prompt_cosine) else measure.prompt_cosine
    return {
        "clip_embedding": np.asarray(measure.embedding, dtype=np.float32).tobytes(),
        "clip_model": measure.model_id,
        # floats go through JSON as their repr: they come back as the same bits
        "clip_cosines": json.dumps({"prompt": prompt, "concepts": dict(measure.concept_cosines)}),
    }


def measure_from_row(batch: Mapping[str, np.ndarray], i: int) -> ClipMeasure | None:
    """Row i's measure, or None when the batch has none for it (CLIP did not run there)."""
    if "clip_embedding" not in batch or not len(batch["clip_embedding"][i]):
        return None
    cosines = json.loads(batch["clip_cosines"][i])
    return ClipMeasure(
        model_id=str(batch["clip_model"][i]),
        embedding=np.frombuffer(batch["clip_embedding"][i], dtype=np.float32),
        prompt_cosine=math.nan if cosines["prompt"] is None else float(cosines["prompt"]),
        concept_cosines={str(k): float(v) for k, v in cosines["concepts"].items()},
    )


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Cosine similarity of matching rows: `[N, D]` x `[N, D]` -> `[N]`, `[N, D]` x `[D]` -> `[N]`,
    `[D]` x `[D]` -> float. Inputs need not be normalised."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embeddings differ in size: {a.shape} and {b.shape}")
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] != b.shape[0]:
        raise ValueError(f"row counts differ: {a.shape} and {b.shape}; use `similarities` for all pairs")
    sims = (unit_rows(a) * unit_rows(b)).sum(axis=-1)
    return float(sims) if np.ndim(sims) == 0 else sims


def similarities(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """All-pairs cosine `[N, M]` of image embeddings `[N, D]` and text embeddings `[M, D]`."""
    return unit_rows(np.asarray(images, np.float64)) @ unit_rows(np.asarray(texts, np.float64)).T


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (all-zero rows stay zero); keeps the dtype."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1).astype(x.dtype)
