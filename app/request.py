"""RenderRequest: one image to render, with everything that decides its pixels.

`image_id` is a hash of exactly those fields (model bytes by sha256, not by name), so the same
request always has the same id: a rerun skips ids already in the catalog, and `imagefab
regenerate ID` can rebuild the request from the catalog row and check the pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bumped when the rendering recipe changes in a way that changes pixels for the same fields.
RECIPE = "sdxl-txt2img-2"  # 2: no negative prompt means zeroed negative embeddings


@dataclass(frozen=True)
class LoraUse:
    name: str
    version: str
    weight: float
    sha256: str
    source: str = ""


@dataclass(frozen=True)
class RenderRequest:
    image_id: str
    prompt: str
    negative_prompt: str
    base_model: dict  # {name, version, sha256, source}
    loras: tuple[LoraUse, ...]
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    template: dict = field(default_factory=dict)  # {name, version, text}
    variables: dict = field(default_factory=dict)  # template variable -> value
    tags: dict = field(default_factory=dict)
    tier: str = "default"
    row_key: str = ""
    variation: int = 0
    combination: str = "default"
    fuse_loras: bool = False

    @property
    def combination_key(self) -> str:
        """Requests with the same key share one loaded model + LoRA stack."""
        stack = ",".join(f"{lo.name}@{lo.weight:g}" for lo in self.loras)
        return f"{self.base_model['name']}|{stack}" + ("|fused" if self.fuse_loras and self.loras else "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> RenderRequest:
        d = json.loads(text)
        d["loras"] = tuple(LoraUse(**lo) for lo in d["loras"])
        return cls(**d)


def compute_image_id(
    *,
    prompt: str,
    negative_prompt: str,
    base_sha256: str,
    loras: tuple[LoraUse, ...] | list[LoraUse],
    scheduler: str,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    fuse_loras: bool = False,
) -> str:
    """32 hex chars of sha256 over the fields that decide the pixels."""
    material = {
        "recipe": RECIPE,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "base": base_sha256,
        "loras": [[lo.sha256, float(lo.weight)] for lo in loras],
        "scheduler": scheduler,
        "steps": int(steps),
        "guidance": float(guidance),
        "width": int(width),
        "height": int(height),
        "seed": int(seed),
    }
    if fuse_loras and loras:  # fused weights round differently; absent when off, so old ids hold
        material["fuse_loras"] = True
    return _digest(material)


def failed_row_id(raw: dict, variation: int) -> str:
    """A stable id for an input row that could not become a request."""
    return _digest({"failed_row": {k: str(v) for k, v in sorted(raw.items())}, "variation": variation})


def _digest(material: dict) -> str:
    text = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
