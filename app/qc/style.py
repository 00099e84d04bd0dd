"""Style consistency: how far an image sits from a set of reference images of the wanted look.

A `StyleReference` is built once per key (a combination or a brand) from a folder of reference
images: the centroid of their CLIP image embeddings (normalised), and their pHashes.
`style_distance = 1 - cos(embedding, centroid)`, 0 for an image on the centroid, up to 2.
The median pHash distance to the references is reported next to it: it speaks to layout (a
brand template with a fixed composition), where CLIP speaks to content and look.

Which reference applies to an image (`QcSettings.style_references`, see `style_key_for`): a key
equal to the image's combination key ("<base model>|<lora>@<weight>,...", as in the bulk job's
`combination` column) wins; otherwise the first key of the form "<tag>=<value>" that matches one
of the image's tags (e.g. "brand=acme"); otherwise no style check for that image.

Distances are only comparable under the CLIP model that built the reference: a reference
records its `model_id` and `distances` refuses embeddings from another one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.qc.checks import decode_image
from app.qc.duplicates import hamming, perceptual_hash

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class StyleReference:
    key: str
    model_id: str  # the ClipScorer.model_id that produced `centroid`
    centroid: np.ndarray  # [D] float32, unit length
    reference_distances: np.ndarray  # [R] style distance of each reference to the centroid
    phashes: tuple[str, ...]
    sources: tuple[str, ...]  # file names (or "#i" for in-memory images)
    digest: str  # sha256 over the sources' names and pixels: changes when the folder does

    @classmethod
    def from_images(
        cls, key: str, images: Sequence[np.ndarray | Image.Image], scorer, sources: Sequence[str] | None = None
    ) -> StyleReference:
        """A reference from images in memory, embedded with `scorer` (a `ClipScorer`)."""
        if not images:
            raise ValueError(f"style reference {key!r} has no images")
        sources = tuple(sources) if sources is not None else tuple(f"#{i}" for i in range(len(images)))
        if len(sources) != len(images):
            raise ValueError(f"style reference {key!r}: {len(images)} images but {len(sources)} source names")
        arrays = [np.asarray(image) for image in images]
        embeddings = scorer.embed_images(arrays)  # [R, D] unit rows
        mean = embeddings.astype(np.float64).mean(axis=0)
        norm = np.linalg.norm(mean)
        if norm == 0:
            raise ValueError(f"style reference {key!r}: the reference embeddings cancel out (no common direction)")
        centroid = (mean / norm).astype(np.float32)
        digest = hashlib.sha256()
        for name, array in zip(sources, arrays):
            digest.update(name.encode() + b"\0" + str(array.shape).encode() + array.tobytes())
        return cls(
            key=key,
            model_id=scorer.model_id,
            centroid=centroid,
            reference_distances=(1.0 - embeddings.astype(np.float64) @ centroid.astype(np.float64)).astype(np.float32),
            phashes=tuple(perceptual_hash(array) for array in arrays),
            sources=sources,
            digest=digest.hexdigest(),
        )

    @classmethod
    def from_folder(cls, key: str, folder: str | Path, scorer) -> StyleReference:
        """A reference from every PNG/JPEG/WebP file directly in `folder` (sorted by name)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"style reference {key!r}: folder {str(folder)!r} does not exist")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
        if not files:
            raise ValueError(
                f"style reference {key!r}: folder {str(folder)!r} has no {'/'.join(REFERENCE_SUFFIXES)} images"
            )
        images = []
        for path in files:
            try:
                images.append(np.asarray(decode_image(path.read_bytes()).convert("RGB")))
            except ValueError as e:
                raise ValueError(f"style reference {key!r}: {path}: {e}") from e
        return cls.from_images(key, images, scorer, sources=[path.name for path in files])

    def distances(self, embeddings: np.ndarray, model_id: str) -> np.ndarray:
        """Style distance `[N]` of image embeddings `[N, D]` made by `model_id`."""
        if model_id != self.model_id:
            raise ValueError(
                f"style reference {self.key!r} was built with CLIP {self.model_id!r}, but the images were "
                f"embedded with {model_id!r}; build the reference with the same model"
            )
        embeddings = np.asarray(embeddings, dtype=np.float64)
        norms = np.linalg.norm(embeddings, axis=-1)
        cosines = embeddings @ self.centroid.astype(np.float64) / np.where(norms > 0, norms, 1.0)
        return 1.0 - cosines

    def median_phash_distance(self, phash: str | int) -> float:
        """Median Hamming distance (bits) from a pHash to the references' pHashes."""
        return float(np.median([hamming(phash, reference) for reference in self.phashes]))


def style_key_for(
    references: Mapping[str, object], combination: str | None, tags: Mapping[str, str] | None
) -> str | None:
    """The key of `references` that applies to an image, or None (see the module docstring)."""
    if combination and combination in references:
        return combination
    for key in references:
        name, sep, value = key.partition("=")
        if sep and tags and tags.get(name) == value:
            return key
    return None
