"""Where QC runs its models: what a QC worker loads once (the CLIP scorer, the style references,
the duplicate index, the NSFW classifier when the `nsfw` check is enabled), and the measuring of
each batch before `decision.py` judges it.

A QC stage builds a `QcModels` in its `__init__` (never at import; CLIP pulls in torch) and calls
`evaluate_batch` per batch:

    models = QcModels.load(settings, duplicates=index)        # index: PhashIndex or an actor adapter
    verdicts = models.evaluate_batch(images, prompts, image_ids=ids, combinations=combos,
                                     tags=tags, nonfinite_fractions=nonfinite)

With a scorer, each batch's images are measured here (`clip_measures.measure_clip`, one pass).
When CLIP runs on the generator (`QcSettings.clip_runs_on_generator`), `load(...,
clip_on_generator=True)` keeps no scorer: each batch brings its images' `ClipMeasure`s
and `evaluate_batch(..., clip_measures=...)` grades those. A scorer is then built only to embed
the style reference folders, once, and let go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from app.conditioning.measures import Measures
from app.qc.checks import is_too_small, rgb_array
from app.qc.clip_measures import ClipMeasure, measure_clip
from app.qc.decision import QcSettings, QcVerdict, evaluate_batch
from app.qc.duplicates import DuplicateIndex
from app.qc.style import StyleReference, style_key_for

if TYPE_CHECKING:
    from app.provenance.screening import NsfwClassifier
    from app.qc.clip import ClipScorer


@dataclass
class QcModels:
    settings: QcSettings
    clip: ClipScorer | None = None
    styles: dict[str, StyleReference] = field(default_factory=dict)
    duplicates: DuplicateIndex | None = None
    clip_on_generator: bool = False  # CLIP measures come with each batch; `clip` stays None
    nsfw: NsfwClassifier | None = None

    @classmethod
    def load(
        cls,
        settings: QcSettings,
        *,
        duplicates: DuplicateIndex | None = None,
        clip: ClipScorer | None = None,
        clip_on_generator: bool = False,
    ) -> QcModels:
        """Build the CLIP scorer (when `clip_model` is set) and the style references.

        Pass `clip` to reuse a scorer already loaded; it must be the model the settings name.
        With `clip_on_generator` no scorer is kept: one is built only when there are style
        references to embed (on `clip_device`, like the QC worker's own CLIP would be).
        Raises `ClipWeightsUnavailable` when the tag's weights are not on this machine, and
        `FileNotFoundError` / `ValueError` naming the key for a bad reference folder.
        """
        clip_on_generator = clip_on_generator and settings.clip_model is not None
        needs_scorer = not clip_on_generator or bool(settings.style_references)
        if settings.clip_model is not None and clip is None and needs_scorer:
            from app.qc.clip import ClipScorer

            clip = ClipScorer.from_settings(settings)
        styles = {
            key: StyleReference.from_folder(key, folder, clip) for key, folder in settings.style_references.items()
        }
        nsfw = None
        if "nsfw" in settings.enabled:
            from app.provenance.screening import NsfwClassifier

            nsfw = NsfwClassifier()
        return cls(settings, None if clip_on_generator else clip, styles, duplicates, clip_on_generator, nsfw)

    def style_for(self, combination: str | None, tags: Mapping[str, str] | None) -> StyleReference | None:
        key = style_key_for(self.styles, combination, tags)
        return None if key is None else self.styles[key]

    def evaluate_batch(
        self,
        images: Sequence[np.ndarray | Image.Image],
        prompts: Sequence[str | None],
        *,
        image_ids: Sequence[str] | None = None,
        combinations: Sequence[str | None] | None = None,
        tags: Sequence[Mapping[str, str] | None] | None = None,
        nonfinite_fractions: Sequence[float] | None = None,
        clip_measures: Sequence[ClipMeasure | None] | None = None,
        conditioning: Sequence[tuple[str, Measures] | None] | None = None,
        siblings: Sequence[str | None] | None = None,
    ) -> list[QcVerdict]:
        """`decision.evaluate_batch` with the loaded parts: the images measured with the scorer
        (when there is one), the style reference of each image picked from its combination key
        and tags. `clip_measures` (one per image, from the generator) are required when the
        models were loaded with `clip_on_generator`, and refused otherwise: an image is never
        graded on numbers from a model QC did not expect. `conditioning`: each image's mode and
        the generator's measures (None for txt2img), as for `decision.evaluate_batch`.
        `siblings`: a group per image whose members are meant to share content (the same kept
        product) and are never duplicates of each other; an A/B test's `ab_group` tag wins."""
        count = len(images)
        if self.clip_on_generator and clip_measures is None:
            raise ValueError("CLIP runs on the generator, but the batch brings no `clip_measures`")
        if not self.clip_on_generator and clip_measures is not None:
            raise ValueError("`clip_measures` were given, but these QC models measure CLIP themselves")
        combinations = [None] * count if combinations is None else combinations
        tags = [None] * count if tags is None else tags
        if len(combinations) != count or len(tags) != count:
            raise ValueError(f"{count} images but {len(combinations)} combinations and {len(tags)} tag maps")
        rgbs = [rgb_array(image) for image in images]
        if self.clip is not None:
            clip_measures = self.measure(rgbs, prompts)
        verdicts = evaluate_batch(
            rgbs,
            prompts,
            self.settings,
            clip_measures=clip_measures,
            duplicates=self.duplicates,
            styles=[self.style_for(c, t) for c, t in zip(combinations, tags)],
            image_ids=image_ids,
            nonfinite_fractions=nonfinite_fractions,
            duplicate_groups=[
                (t or {}).get("ab_group") or (siblings[k] if siblings is not None else None) for k, t in enumerate(tags)
            ],
            conditioning=conditioning,
        )
        if self.nsfw is None:
            return verdicts
        return [self._grade_nsfw(image, verdict) for image, verdict in zip(images, verdicts)]

    def _grade_nsfw(self, image: np.ndarray | Image.Image, verdict: QcVerdict) -> QcVerdict:
        """The verdict with the `nsfw` score, and the reason `nsfw` (reject) or `borderline_nsfw`."""
        if self.nsfw is None or "too_small" in verdict.reasons:
            return verdict
        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
        score = self.nsfw.score(rgb).score
        reasons, status = list(verdict.reasons), verdict.status
        if score >= self.settings.max_nsfw:
            reasons.insert(0, "nsfw")
            status = "rejected"
        elif score >= self.settings.review_nsfw:
            reasons.append("borderline_nsfw")
            status = "review" if status == "accepted" else status
        return QcVerdict(
            status, tuple(reasons), {**verdict.scores, "nsfw": score}, verdict.phash, verdict.nearest_duplicate
        )

    def measure(self, images: Sequence[np.ndarray], prompts: Sequence[str | None]) -> list[ClipMeasure | None]:
        """CLIP's numbers for RGB uint8 images, in one pass over those QC can judge (None for an
        image too small to measure: `evaluate_batch` rejects it without them)."""
        if self.clip is None:
            raise ValueError(
                "these QC models hold no CLIP scorer: `clip_model` is not set, or CLIP runs on the generator"
            )
        judged = [i for i, image in enumerate(images) if not is_too_small(image)]
        measures: list[ClipMeasure | None] = [None] * len(images)
        if judged:
            measured = measure_clip(
                self.clip, [images[i] for i in judged], [prompts[i] for i in judged], self.settings.negative_concepts
            )
            for i, measure in zip(judged, measured):
                measures[i] = measure
        return measures
