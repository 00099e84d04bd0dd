"""What QC loads once per worker: the CLIP scorer, the style references, the duplicate index.

A QC stage builds a `QcModels` in its `__init__` (never at import; CLIP pulls in torch) and calls
`evaluate_batch` per batch:

    models = QcModels.load(settings, duplicates=index)        # index: PhashIndex or an actor adapter
    verdicts = models.evaluate_batch(images, prompts, image_ids=ids, combinations=combos,
                                     tags=tags, nonfinite_fractions=nonfinite)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from app.qc.decision import QcSettings, QcVerdict, evaluate_batch
from app.qc.duplicates import DuplicateIndex
from app.qc.style import StyleReference, style_key_for

if TYPE_CHECKING:
    from app.qc.clip import ClipScorer


@dataclass
class QcModels:
    settings: QcSettings
    clip: ClipScorer | None = None
    styles: dict[str, StyleReference] = field(default_factory=dict)
    duplicates: DuplicateIndex | None = None

    @classmethod
    def load(
        cls, settings: QcSettings, *, duplicates: DuplicateIndex | None = None, clip: ClipScorer | None = None
    ) -> QcModels:
        """Build the CLIP scorer (when `clip_model` is set) and the style references.

        Pass `clip` to reuse a scorer already loaded; it must be the model the settings name.
        Raises `ClipWeightsUnavailable` when the tag's weights are not on this machine, and
        `FileNotFoundError` / `ValueError` naming the key for a bad reference folder.
        """
        if settings.clip_model is not None and clip is None:
            from app.qc.clip import ClipScorer

            clip = ClipScorer.from_settings(settings)
        styles = {
            key: StyleReference.from_folder(key, folder, clip) for key, folder in settings.style_references.items()
        }
        return cls(settings, clip, styles, duplicates)

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
    ) -> list[QcVerdict]:
        """`decision.evaluate_batch` with the loaded parts; the style reference of each image is
        picked from its combination key and tags."""
        count = len(images)
        combinations = [None] * count if combinations is None else combinations
        tags = [None] * count if tags is None else tags
        if len(combinations) != count or len(tags) != count:
            raise ValueError(f"{count} images but {len(combinations)} combinations and {len(tags)} tag maps")
        return evaluate_batch(
            images,
            prompts,
            self.settings,
            clip=self.clip,
            duplicates=self.duplicates,
            styles=[self.style_for(c, t) for c, t in zip(combinations, tags)],
            image_ids=image_ids,
            nonfinite_fractions=nonfinite_fractions,
            duplicate_groups=[(t or {}).get("ab_group") for t in tags],
        )
