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


class OpenAIImageRequest(BaseModel):
    # extra fields (quality, style, background…) are accepted and ignored, as other servers do
    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
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
    override_settings: dict[str, Any] = {}


class A1111PngInfo(BaseModel):
    image: str  # base64, optionally a data: URL
