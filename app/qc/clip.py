"""Prompt adherence: image and text embeddings from an open_clip model.

`ClipScorer` loads once (in a stage's `__init__`, never at import) and embeds batches of images
and texts into L2-normalised vectors; `clip_measures.cosine` compares them. The catalog stores the raw cosine
as `clip_score` (CLIPScore, Hessel et al. 2021, is 2.5 * max(cosine, 0); torchmetrics reports
max(100 * cosine, 0)).

Weights are never downloaded here. `pretrained` is either
- None: random weights, seeded, so tests and offline runs get the same numbers every time. The
  cosines then mean nothing; only the mechanics can be checked. The package ships a tiny config,
  `imagefab-tiny-clip` (32-d embeddings, 1.9 M parameters), for that.
- an open_clip tag (`ViT-B-32` + `laion2b_s34b_b79k`): looked up in the local caches open_clip
  would download into (the Hugging Face hub cache, or `~/.cache/clip` for URL weights). Missing
  weights raise `ClipWeightsUnavailable` naming the tag and the places looked in; no network call
  is made, so it cannot hang.
- a path to a checkpoint file.

Image preprocessing is the model's own open_clip transform (resize the shorter side, centre crop,
normalise with the tag's mean/std).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image

from app.qc.checks import rgb_array
from app.qc.clip_measures import clip_model_id, unit_rows

CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
TINY_MODEL = "imagefab-tiny-clip"

# Where open_clip puts weights it downloads from plain URLs (its `download_pretrained_from_url`).
URL_WEIGHTS_DIR = Path("~/.cache/clip").expanduser()


class ClipWeightsUnavailable(RuntimeError):
    """The weights for a model + pretrained tag are not on this machine."""


def _register_packaged_configs() -> None:
    """Make the configs shipped in `clip_configs/` known to open_clip (idempotent)."""
    shipped = {path.stem for path in CONFIG_DIR.glob("*.json")}
    if not shipped <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA when this process sees a GPU (the generator's), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be 'auto', 'cpu' or 'cuda', but is {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`device` is 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'")
    return torch.device(device)


def local_weights(model_name: str, pretrained: str) -> tuple[str, dict]:
    """(checkpoint path, the tag's preprocessing config) for a pretrained tag or a file path.

    Raises `ValueError` for a tag open_clip does not know for this model, and
    `ClipWeightsUnavailable` when a known tag's weights are not in the local caches.
    """
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        if os.path.isfile(pretrained):
            return pretrained, {}
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"`clip_pretrained` {pretrained!r} is neither a pretrained tag of {model_name!r} nor a "
            f"file; tags for {model_name!r}: {tags or 'none (use None for random weights)'}"
        )
    looked_in = []
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache  # reads the cache only, no network

        # "org/repo/" means the default file names, "org/repo/file.pt" names the file
        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return found, tag_cfg
            looked_in.append(f"Hugging Face cache {repo_id}/{candidate}")
    url = tag_cfg.get("url", "")
    if url:
        path = URL_WEIGHTS_DIR / os.path.basename(url)
        if path.is_file():
            return str(path), tag_cfg
        looked_in.append(str(path))
    raise ClipWeightsUnavailable(
        f"CLIP weights for model {model_name!r} with pretrained tag {pretrained!r} are not on this "
        f"machine (looked in: {'; '.join(looked_in)}), and QC never downloads them. Fetch them "
        f"where the hub is reachable (open_clip.create_model_and_transforms({model_name!r}, "
        f"pretrained={pretrained!r}) fills the same cache), or set `clip_pretrained` to the "
        f"checkpoint file's path."
    )


class ClipScorer:
    """Embeds images and texts with one open_clip model; L2-normalised float32 numpy out."""

    def __init__(
        self,
        model_name: str = TINY_MODEL,
        pretrained: str | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        text_cache_size: int = 4096,
    ):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, but is {batch_size}")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"`threads` must be >= 1 or None, but is {threads}")
            # Process-wide: QC actors own their process, and one CLIP per process is the rule.
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        _register_packaged_configs()
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"`clip_model` {model_name!r} is not an open_clip architecture; e.g. {TINY_MODEL!r} "
                f"(shipped, for tests), 'ViT-B-32', 'ViT-L-14' (see open_clip.list_models())"
            )

        # 1. Find the weights (never downloads)
        checkpoint, tag_cfg = local_weights(model_name, pretrained) if pretrained else (None, {})

        # 2. Build on the CPU under a fixed seed (the same random weights on any machine), then move
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=checkpoint,
                # a checkpoint passed as a path skips open_clip's tag checks: carry what the tag says
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
            )
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.dim = int(open_clip.get_model_config(model_name)["embed_dim"])
        self.pretrained = pretrained
        self.seed = seed
        self.batch_size = batch_size
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_size = text_cache_size

    @classmethod
    def from_settings(cls, settings) -> ClipScorer:
        """The scorer `QcSettings` asks for (`clip_model` must be set)."""
        if settings.clip_model is None:
            raise ValueError("`clip_model` is not set in the QC settings, so there is no CLIP scorer to build")
        return cls(
            settings.clip_model,
            settings.clip_pretrained,
            device=settings.clip_device,
            threads=settings.clip_threads,
            seed=settings.clip_seed,
            batch_size=settings.clip_batch_size,
        )

    @property
    def model_id(self) -> str:
        """What produced the embeddings, e.g. "ViT-B-32/laion2b_s34b_b79k" or "imagefab-tiny-clip/random-0".

        Embeddings are only comparable between equal ids (style references check it).
        """
        return clip_model_id(self.model_name, self.pretrained, self.seed)

    def embed_images(self, images: Sequence[np.ndarray | Image.Image]) -> np.ndarray:
        """L2-normalised embeddings `[N, D]` float32 of uint8 images (RGB, gray or RGBA)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            # pixels: [B, 3, S, S] float32, the model's own resize / crop / normalisation
            pixels = torch.stack([self.preprocess(Image.fromarray(rgb_array(image))) for image in chunk])
            with torch.inference_mode():
                features = self.model.encode_image(pixels.to(self.device))
            out.append(features.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return unit_rows(np.concatenate(out))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings `[N, D]` float32; repeated texts come from an LRU cache."""
        missing = list(dict.fromkeys(text for text in texts if text not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens = self.tokenizer(chunk)  # [B, context_length] int64
            with torch.inference_mode():
                features = self.model.encode_text(tokens.to(self.device))
            for text, vector in zip(chunk, unit_rows(features.float().cpu().numpy())):
                self._text_cache[text] = vector
        vectors = []
        for text in texts:
            self._text_cache.move_to_end(text)
            vectors.append(self._text_cache[text])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        if not vectors:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(vectors)

    @property
    def cached_texts(self) -> int:
        return len(self._text_cache)
