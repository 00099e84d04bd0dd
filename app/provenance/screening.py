"""Content screening: prompts before rendering, pixels after (NSFW classifier).

Prompt terms are matched on Unicode-normalised word boundaries: the prompt and the terms are
NFKC-normalised and case-folded (so "ＮＵＤＥ" and "Nude" match "nude"), and a term matches only
as whole words (so "Scunthorpe" and "analysis" pass a list that holds their substrings). A term of
several words matches with any whitespace between them.

The pixel check is NudeNet's detector (its ONNX model ships inside the `nudenet` wheel, so it runs
offline): the NSFW score of an image is the highest confidence among the explicit classes.
Ordinary photographs give low-score detections (benchmarks/RESULTS.md), hence a threshold.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# Explicit-content classes of NudeNet's detector; covered parts and faces do not count.
NSFW_CLASSES = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)

# A starting list for product and marketing imagery; specs replace it (`screening.prompt_terms`).
DEFAULT_PROMPT_TERMS = (
    "nude",
    "nudity",
    "naked",
    "topless",
    "nsfw",
    "porn",
    "pornographic",
    "explicit sex",
    "sexual intercourse",
    "genitals",
    "gore",
    "beheading",
    "child abuse",
)


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@dataclass(frozen=True)
class PromptScreen:
    """Blocks prompts that contain any of `terms` as whole words."""

    terms: tuple[str, ...] = DEFAULT_PROMPT_TERMS
    _compiled: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        cleaned = tuple(normalise(term) for term in self.terms)
        empty = [term for term, clean in zip(self.terms, cleaned) if not clean]
        if empty:
            raise ValueError(f"prompt screening terms must contain visible characters, got {empty!r}")
        object.__setattr__(self, "_compiled", _pattern(cleaned) if cleaned else None)

    def matches(self, *texts: str) -> list[str]:
        """The blocked terms found in `texts` (normalised, in order of appearance, unique)."""
        pattern = self._compiled
        if pattern is None:
            return []
        found: list[str] = []
        for text in texts:
            for match in pattern.finditer(normalise(text)):
                term = " ".join(match.group(0).split())
                if term not in found:
                    found.append(term)
        return found

    def reason(self, prompt: str) -> str | None:
        """The failed row's reason for `prompt`, or None when it may be rendered."""
        found = self.matches(prompt)
        return f"prompt_blocked: {', '.join(found)}" if found else None


def _pattern(terms: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so "explicit sex" wins over a shorter term that starts it.
    alternatives = sorted({r"\s+".join(map(re.escape, term.split())) for term in terms}, key=len, reverse=True)
    # \w is Unicode-aware: a boundary is any change between a word character and anything else.
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


# ---------------------------------------------------------------------------------------------
# NSFW classifier
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NsfwScore:
    score: float  # 0..1: the highest explicit-class confidence (0 when none detected)
    classes: tuple[str, ...]  # explicit classes detected, highest first


class NsfwClassifier:
    """NudeNet's detector, loaded once per worker (an ONNX Runtime session on the CPU)."""

    def __init__(self, threads: int = 1):
        import onnxruntime
        from nudenet import NudeDetector

        detector = NudeDetector()
        options = onnxruntime.SessionOptions()
        # One thread: a QC worker holds a fraction of a core, and ONNX Runtime would otherwise
        # start a thread per core on every node.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        detector.onnx_session = onnxruntime.InferenceSession(
            detector.onnx_session._model_path, options, providers=["CPUExecutionProvider"]
        )
        self.detector = detector

    def score(self, rgb: np.ndarray) -> NsfwScore:
        """Score one [H, W, 3] uint8 RGB image."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"NSFW scoring takes [H, W, 3] RGB pixels, got shape {list(rgb.shape)}")
        # NudeNet converts arrays with RGBA->BGR, then swaps to RGB for the network.
        rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
        detections = [d for d in self.detector.detect(rgba) if d["class"] in NSFW_CLASSES]
        detections.sort(key=lambda d: d["score"], reverse=True)
        top = float(detections[0]["score"]) if detections else 0.0
        return NsfwScore(score=top, classes=tuple(dict.fromkeys(d["class"] for d in detections)))
