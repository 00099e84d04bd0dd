"""HTTP request and response bodies of the three dialects the Serve app speaks.

Types and ranges that never change are declared here (FastAPI answers 422 naming the field);
limits a deployment sets (prompt length, images per request, size) are checked in
`ServeCore.plan`, also with a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- native -----------------------------------------------------------------------------------------


class GenerateRequest(_Body):
    prompt: str = Field(description="What to render.")
    negative_prompt: str = ""
    combination: str | None = Field(None, description="A served combination (GET /v1/models); default: the first.")
    loras: list[dict[str, Any]] | None = Field(
        None, description="Replaces the combination's LoRA stack: [{name, weight}]."
    )
    seed: int | None = Field(None, ge=-1, description="-1 or absent: random. Image k gets seed + k.")
    n: int = Field(1, ge=1, le=64)
    steps: int | None = Field(None, ge=1, le=500)
    guidance: float | None = Field(None, ge=0, le=50)
    scheduler: str | None = None
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    size: str | None = Field(None, description="WIDTHxHEIGHT or a size preset, instead of width/height.")
    tags: dict[str, str] = {}
    response_format: Literal["b64_json", "url"] = "b64_json"


class GeneratedImage(BaseModel):
    image_id: str
    seed: int
    status: str
    reasons: list[str]
    scores: dict[str, Any]
    width: int
    height: int
    uri: str
    url: str | None = None
    b64_json: str | None = None
    error: str = ""


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    combination: str
    seconds: float


# --- OpenAI Images API --------------------------------------------------------------------------------


class OpenAIImageRequest(_Body):
    """`images.generate`'s fields. Each is honoured or refused with a 400 naming it (as is any
    field OpenAI does not define): none is accepted and then ignored."""

    prompt: str
    model: str | None = Field(None, description="A combination or a base model (GET /v1/models).")
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, description="WIDTHxHEIGHT, a size preset, or auto (the server's default).")
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = Field(
        None, description="A factor on the combination's steps (the server's `quality_steps`)."
    )
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg/webp encoder quality, as OpenAI's: 100 (default) compresses least."
    )
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="opaque or auto; transparent is refused (SDXL renders no alpha)."
    )
    moderation: Literal["auto", "low"] | None = Field(None, description="low only: nothing but QC filters images here.")
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Refused: a combination (model) decides the look."
    )
    user: str | None = None


# --- AUTOMATIC1111 --api --------------------------------------------------------------------------------


class A1111Txt2Img(BaseModel):
    # A1111 clients send many fields this server does not use (hires fix, restore faces, …): ignored.
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = Field(20, ge=1, le=500)
    cfg_scale: float = Field(7.0, ge=0, le=50)
    width: int = Field(512, ge=8, le=8192)
    height: int = Field(512, ge=8, le=8192)
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients
    scheduler: str | None = Field(
        None, description="A1111 1.9+: Automatic, Karras, SGM Uniform (GET /sdapi/v1/schedulers)."
    )
    override_settings: dict[str, Any] = {}


class A1111PngInfo(BaseModel):
    image: str  # base64, optionally a data: URL
