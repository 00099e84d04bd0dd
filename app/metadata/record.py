"""`ImageMetadata`: what made one image, the record every file written for it carries."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from app.request import LoraRef

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ImageMetadata:
    """What made one image; embedded in every file written for it.

    `model_hash` and each LoRA's `sha256` are the sha256 of the weights file (64 hex), or ""
    when unknown. `loras` accepts `LoraRef`s or plain `(name, weight, sha256)` tuples; what is
    embedded of each is its name, weight and sha256.

    `conditioning` is an image-conditioned image's input (the request's `Conditioning` as a dict:
    mode, image_uri, image_sha256, mask_uri, mask_sha256, strength, mask_blur, …); empty for
    txt2img, and then left out of the JSON, so a txt2img file's bytes do not change with it.
    """

    image_id: str
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_name: str
    model_hash: str
    loras: tuple[LoraRef, ...] = ()
    run_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    conditioning: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise numbers so that "CFG scale: 5.0" and the JSON do not depend on whether the
        # caller passed 5 or 5.0 (or a numpy scalar, which json cannot write).
        for name in ("steps", "seed", "width", "height"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        object.__setattr__(self, "model_hash", _check_sha256("model_hash", self.model_hash))
        loras = tuple(
            LoraRef(name=str(name), weight=float(weight), sha256=_check_sha256(f"loras[{i}].sha256", sha256))
            for i, (name, weight, sha256) in enumerate(
                (lo.name, lo.weight, lo.sha256) if isinstance(lo, LoraRef) else lo for lo in self.loras
            )
        )
        object.__setattr__(self, "loras", loras)
        # A private copy: the caller's dict must not change what is embedded later.
        object.__setattr__(self, "extra", {str(k): str(v) for k, v in self.extra.items()})
        object.__setattr__(self, "conditioning", _plain(self.conditioning))

    @property
    def mode(self) -> str:
        return str(self.conditioning.get("mode") or "txt2img")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "sampler": self.sampler,
            "cfg_scale": self.cfg_scale,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "loras": [{"name": lo.name, "weight": lo.weight, "sha256": lo.sha256} for lo in self.loras],
            "run_id": self.run_id,
            "extra": dict(self.extra),
            **({"conditioning": dict(self.conditioning)} if self.conditioning else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageMetadata:
        """Inverse of `to_dict` (e.g. on `read_metadata(...)["imagefab"]`)."""
        fields = dict(data)
        fields["loras"] = tuple(LoraRef(**lora) for lora in fields.get("loras", ()))
        return cls(**fields)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy with JSON's own scalars (numpy numbers become int / float)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, Integral):
            out[str(key)] = int(value)
        elif isinstance(value, Real):
            out[str(key)] = float(value)
        else:
            raise ValueError(f"`conditioning.{key}` must be text or a number, but is {value!r}")
    return out


def _check_sha256(name: str, value: str) -> str:
    value = value.lower()
    if value and not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"`{name}` must be a sha256 hex digest (64 hex characters) or '', but is {value!r}")
    return value
