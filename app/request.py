"""RenderRequest: one image to render, with everything that decides its pixels.

`image_id` is a hash of exactly those fields (model bytes by sha256, not by name), so the same
request always has the same id: a rerun skips ids already in the catalog, and `imagefab
regenerate ID` can rebuild the request from the catalog row and check the pixels.

Between Ray stages a request travels as one typed Arrow struct column, `request`, of
`REQUEST_TYPE`. The struct is derived from the dataclass: each field names its Arrow type (and,
where it is not a plain scalar, how a value read back from Arrow becomes the Python one), so a new
request field is one line here. Readers call `requests_from_column` (an Arrow column),
`request_at(batch, i)` (a row of a Ray Data batch, numpy or Arrow) or `requests_from_batch`.

`LoraRef` is the one reference to a LoRA: a spec names it (name, weight), expansion resolves it
(version, sha256, source), the catalog and the image metadata record it. `format_lora_tag` and
`parse_lora_tags` are the one place for the A1111 prompt syntax `<lora:name:weight>`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field

from app.columns import object_column

# Bumped when the rendering recipe changes in a way that changes pixels for the same fields.
RECIPE = "sdxl-txt2img-2"  # 2: no negative prompt means zeroed negative embeddings
# The same for image-conditioned modes (img2img, inpaint, outpaint, upscale): in their ids only.
CONDITIONED_RECIPE = "sdxl-conditioned-1"

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "upscale")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA in a stack. A spec gives name and weight; the resolved model fills in the rest."""

    # Specs validate these through pydantic (app/spec.py): the bounds hold for spec files and HTTP.
    __pydantic_config__ = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    version: str = ""
    weight: Annotated[float, Field(ge=-4.0, le=4.0)] = 1.0
    sha256: str = ""
    source: str = ""


# Arrow types of the request's parts; the catalog schema (app/catalog/schema.py) uses the same.
MODEL_TYPE = pa.struct(
    [("name", pa.string()), ("version", pa.string()), ("sha256", pa.string()), ("source", pa.string())]
)
LORA_TYPE = pa.struct([(f.name, pa.float64() if f.name == "weight" else pa.string()) for f in fields(LoraRef)])
TEMPLATE_TYPE = pa.struct([("name", pa.string()), ("version", pa.string()), ("text", pa.string())])
STRMAP_TYPE = pa.map_(pa.string(), pa.string())


@dataclass(frozen=True)
class Conditioning:
    """What an image-conditioned request starts from, and how (app/conditioning/plan.py makes it).

    The input image and mask are named by a resolved URI (an absolute path or `s3://…`) and their
    bytes' sha256: `image_id` covers the sha256s, so the same bytes render the same image wherever
    they are read from, and a changed file is noticed (`regenerate`, a resumed run)."""

    mode: str  # img2img | inpaint | outpaint | upscale
    image_uri: str
    image_sha256: str
    mask_uri: str = ""  # "" when the mask is the image's alpha or an outpainting canvas
    mask_sha256: str = ""
    mask_source: str = ""  # mask | alpha | canvas; "" for img2img and upscale
    strength: float = 0.0  # the denoising strength (A1111's `denoising_strength`)
    mask_blur: int = 0  # px of Gaussian blur on the mask the model sees (A1111's `Mask blur`)
    blend_px: int = 0  # the feathered band inside the kept region along the seam
    target: str = ""  # outpaint: the ratio, size or platform as given
    anchor: str = ""  # outpaint: where the original sits on the canvas
    fill: str = ""  # outpaint: the new area's initial fill (edge | reflect | mean)
    resize_mode: str = ""  # img2img: how the input meets the render size (crop | fill | stretch)
    scale: float = 0.0  # upscale: the factor
    tile: int = 0  # upscale: tile side in pixels
    tile_overlap: int = 0
    source_width: int = 0  # the input image's size
    source_height: int = 0

    def pixel_fields(self) -> dict:
        """Everything that decides the pixels: all but the URIs."""
        return {k: v for k, v in asdict(self).items() if not k.endswith("_uri")}


CONDITIONING_TYPE = pa.struct(
    [(f.name, {"float": pa.float64(), "int": pa.int32()}.get(str(f.type), pa.string())) for f in fields(Conditioning)]
)


def _as_conditioning(value: Any) -> Conditioning | None:
    if value is None or isinstance(value, Conditioning):
        return value
    d = _as_dict(value)
    if not d:
        return None
    cast = {f.name: {"float": float, "int": int}.get(str(f.type), str) for f in fields(Conditioning)}
    return Conditioning(**{k: cast[k](v) for k, v in d.items() if v is not None and k in cast})


def _conditioning_value(value: Conditioning | None) -> dict | None:
    return None if value is None else asdict(value)


def _as_dict(value: Any) -> dict:
    """A struct or map as Arrow hands it back: a dict, a list of (key, value) pairs (`to_pylist`),
    or an array of 2-element arrays (Ray Data's numpy batches); None is empty."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return {k: v for k, v in value}


def _as_loras(value: Any) -> tuple[LoraRef, ...]:
    if value is None:
        return ()
    return tuple(lo if isinstance(lo, LoraRef) else LoraRef(**_as_dict(lo)) for lo in value)


def _loras_value(loras: Sequence[LoraRef]) -> list[dict]:
    return [asdict(lo) for lo in loras]


def _map_value(d: Mapping) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in d.items()]


def _struct_value(d: Mapping) -> dict | None:
    return dict(d) if d else None  # an empty template is a null struct


def _arrow(
    type_: pa.DataType, read: Callable[[Any], Any] | None = None, write: Callable[[Any], Any] | None = None
) -> dict:
    """A request field's Arrow type (its `field` metadata); `read` turns a value read back from
    Arrow (or from a Ray Data numpy batch) into the Python value, `write` the Python value into
    what Arrow takes."""
    return {"arrow": type_, "read": read, "write": write}


@dataclass(frozen=True)
class RenderRequest:
    """One image to render. Each field carries its Arrow type (`_arrow`): `REQUEST_TYPE` is made
    from them, so a new field is this one line (plus `compute_image_id` when it decides pixels)."""

    image_id: str = field(metadata=_arrow(pa.string()))
    prompt: str = field(metadata=_arrow(pa.string()))
    negative_prompt: str = field(metadata=_arrow(pa.string()))
    # {name, version, sha256, source}
    base_model: dict = field(metadata=_arrow(MODEL_TYPE, read=_as_dict))
    loras: tuple[LoraRef, ...] = field(metadata=_arrow(pa.list_(LORA_TYPE), read=_as_loras, write=_loras_value))
    scheduler: str = field(metadata=_arrow(pa.string()))
    steps: int = field(metadata=_arrow(pa.int32(), read=int))
    guidance: float = field(metadata=_arrow(pa.float64(), read=float))
    width: int = field(metadata=_arrow(pa.int32(), read=int))
    height: int = field(metadata=_arrow(pa.int32(), read=int))
    seed: int = field(metadata=_arrow(pa.int64(), read=int))
    # {name, version, text}; {} (a null struct) without a template
    template: dict = field(default_factory=dict, metadata=_arrow(TEMPLATE_TYPE, read=_as_dict, write=_struct_value))
    # template variable -> value
    variables: dict = field(default_factory=dict, metadata=_arrow(STRMAP_TYPE, read=_as_dict, write=_map_value))
    tags: dict = field(default_factory=dict, metadata=_arrow(STRMAP_TYPE, read=_as_dict, write=_map_value))
    tier: str = field(default="default", metadata=_arrow(pa.string()))
    row_key: str = field(default="", metadata=_arrow(pa.string()))
    variation: int = field(default=0, metadata=_arrow(pa.int32(), read=int))
    # The attempts of one row in one combination: every pixel-deciding field but the seed
    # (`row_group_id`); a quota (app/quota.py) counts accepted images per group. Not in image_id.
    row_group: str = field(default="", metadata=_arrow(pa.string()))
    combination: str = field(default="default", metadata=_arrow(pa.string()))
    fuse_loras: bool = field(default=False, metadata=_arrow(pa.bool_(), read=bool))
    # null for txt2img
    conditioning: Conditioning | None = field(
        default=None, metadata=_arrow(CONDITIONING_TYPE, read=_as_conditioning, write=_conditioning_value)
    )

    @property
    def mode(self) -> str:
        return "txt2img" if self.conditioning is None else self.conditioning.mode

    def pixel_id(self) -> str:
        """The id its pixel-deciding fields hash to: `image_id`, unless a field was changed since."""
        return compute_image_id(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            base_sha256=self.base_model["sha256"],
            loras=self.loras,
            scheduler=self.scheduler,
            steps=self.steps,
            guidance=self.guidance,
            width=self.width,
            height=self.height,
            seed=self.seed,
            fuse_loras=self.fuse_loras,
            conditioning=self.conditioning,
        )

    def row_group_id(self) -> str:
        """The id its attempts share: `image_id`'s fields without the seed."""
        return row_group_id(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            base_sha256=self.base_model["sha256"],
            loras=self.loras,
            scheduler=self.scheduler,
            steps=self.steps,
            guidance=self.guidance,
            width=self.width,
            height=self.height,
            fuse_loras=self.fuse_loras,
            conditioning=self.conditioning,
        )

    @property
    def combination_key(self) -> str:
        """Requests with the same key share one loaded model + LoRA stack."""
        stack = ",".join(f"{lo.name}@{lo.weight:g}" for lo in self.loras)
        return f"{self.base_model['name']}|{stack}" + ("|fused" if self.fuse_loras and self.loras else "")

    def to_arrow_value(self) -> dict:
        """This request as one value of `REQUEST_TYPE` (what `pa.array(..., REQUEST_TYPE)` takes)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = f.metadata["write"](value) if f.metadata["write"] else value
        return out

    @classmethod
    def from_arrow_value(cls, value: Mapping | RenderRequest) -> RenderRequest:
        """Inverse of `to_arrow_value`, also for a row as Ray Data's numpy batches give it (a dict
        whose lists and maps are numpy arrays). A field the value lacks takes its default."""
        if isinstance(value, RenderRequest):
            return value
        kw = {}
        for f in fields(cls):
            if f.name in value and value[f.name] is not None:
                kw[f.name] = f.metadata["read"](value[f.name]) if f.metadata["read"] else value[f.name]
        return cls(**kw)


# The one declaration of the `request` column's type.
REQUEST_TYPE = pa.struct([(f.name, f.metadata["arrow"]) for f in fields(RenderRequest)])


def requests_to_arrow(requests: Iterable[RenderRequest]) -> pa.StructArray:
    """A `request` column of `REQUEST_TYPE`."""
    return pa.array([r.to_arrow_value() for r in requests], type=REQUEST_TYPE)


def requests_to_numpy(requests: Iterable[RenderRequest]) -> np.ndarray:
    """A `request` column as Ray Data's numpy batches carry it: an object array of struct dicts."""
    return object_column([r.to_arrow_value() for r in requests])


def requests_from_column(column: pa.Array | pa.ChunkedArray) -> list[RenderRequest]:
    """Every request of an Arrow `request` column."""
    return [RenderRequest.from_arrow_value(v) for v in column.to_pylist()]


def request_at(batch: Mapping | pa.Table | pa.RecordBatch, i: int) -> RenderRequest:
    """Row i's request in a Ray Data batch: numpy (`batch_format="numpy"`: an object array of
    dicts) or Arrow (`"pyarrow"`)."""
    column = batch["request"] if isinstance(batch, Mapping) else batch.column("request")
    value = column[i]
    if isinstance(value, pa.Scalar):
        value = value.as_py()
    return RenderRequest.from_arrow_value(value)


def requests_from_batch(batch: Mapping | pa.Table | pa.RecordBatch, rows: Iterable[int]) -> list[RenderRequest]:
    """The requests of `rows` (indices into the batch)."""
    return [request_at(batch, i) for i in rows]


# --- the A1111 prompt syntax for LoRAs ---------------------------------------------------------
# <lora:name:weight>, optionally with a third part (A1111's text-encoder weight), which is ignored.
LORA_TAG = re.compile(r"<lora:([^:<>]+):([^:<>]+)(?::[^<>]*)?>")


def format_lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{weight:g}>"


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """'a cat <lora:style:0.8>' -> ('a cat', [('style', '0.8')]): the prompt without its tags
    (whitespace collapsed) and each tag's name and weight as written, for the caller to check."""
    tags = [(name.strip(), weight.strip()) for name, weight in LORA_TAG.findall(prompt)]
    return " ".join(LORA_TAG.sub(" ", prompt).split()), tags


# --- identity ----------------------------------------------------------------------------------
def compute_image_id(
    *,
    prompt: str,
    negative_prompt: str,
    base_sha256: str,
    loras: Sequence[LoraRef],
    scheduler: str,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    fuse_loras: bool = False,
    conditioning: Conditioning | None = None,
) -> str:
    """32 hex chars of sha256 over the fields that decide the pixels."""
    return _digest(
        _pixel_material(
            prompt=prompt,
            negative_prompt=negative_prompt,
            base_sha256=base_sha256,
            loras=loras,
            scheduler=scheduler,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            seed=seed,
            fuse_loras=fuse_loras,
            conditioning=conditioning,
        )
    )


def row_group_id(*, seed: int | None = None, **fields: Any) -> str:
    """32 hex chars of sha256 over the pixel-deciding fields but the seed: a row's attempts in one
    combination share it (two input rows that ask for the same pixels share it too, as they share
    image ids)."""
    material = _pixel_material(seed=0, **fields)
    del material["seed"]
    return _digest({"row_group": material})


def _pixel_material(
    *,
    prompt: str,
    negative_prompt: str,
    base_sha256: str,
    loras: Sequence[LoraRef],
    scheduler: str,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    fuse_loras: bool = False,
    conditioning: Conditioning | None = None,
) -> dict:
    material: dict[str, Any] = {
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
    if conditioning is not None:  # absent for txt2img, so its ids hold
        material["recipe"] = CONDITIONED_RECIPE
        material["conditioning"] = conditioning.pixel_fields()
    return material


def failed_row_id(raw: dict, variation: int) -> str:
    """A stable id for an input row that could not become a request."""
    return _digest({"failed_row": {k: str(v) for k, v in sorted(raw.items())}, "variation": variation})


def _digest(material: dict) -> str:
    text = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
