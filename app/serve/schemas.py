"""HTTP request and response bodies of the three dialects the Serve app speaks.

Types and ranges that never change are declared here (FastAPI answers 422 naming the field);
limits a deployment sets (prompt length, images per request, size) are checked in
`ServeCore.plan`, also with a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    # Bodies reach the models through `strict_json` (app/serve/bodies.py); NaN and infinities are
    # refused here too, for a model used without it.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, starting with the field it names.")
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(description="The field at fault, by its path (loras.0.weight); null: the whole request.")
    code: int | str | None = Field(description="The HTTP status; in the OpenAI dialect OpenAI's string code.")


class ErrorResponse(BaseModel):
    """Every refusal, in every dialect (the framework's own included)."""

    error: ErrorDetail


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
    # Image-conditioned generation: an input image (and mask) as base64 or data:image/…;base64, URLs,
    # and the mode's settings, the same as a spec's `image` section (docs/SPEC.md).
    image: str | None = Field(None, description="The input image, base64 (PNG, JPEG or WebP). Needs `mode`.")
    mask: str | None = Field(
        None, description="inpaint/outpaint: a mask image of the input's size, white = generate, black = keep."
    )
    mode: Literal["img2img", "inpaint", "outpaint", "upscale"] | None = Field(
        None,
        description="What to do with `image`; inpaint without `mask` takes the image's alpha (transparent = generate).",
    )
    strength: float | None = Field(
        None, description="(0, 1]; default per mode: img2img 0.6, inpaint and outpaint 1.0, upscale 0.3."
    )
    mask_blur: int = Field(4, description="inpaint/outpaint: blur (px) of the mask the model sees, 0..64.")
    blend_px: int = Field(4, description="inpaint/outpaint: the feathered band inside the kept region, 0..64.")
    target: str | None = Field(None, description="outpaint: a ratio (9:16), a size (1080x1920) or a platform preset.")
    anchor: str = Field("center", description="outpaint: where the original sits on the canvas.")
    fill: Literal["edge", "reflect", "mean"] = Field("edge", description="outpaint: the new area's initial fill.")
    resize_mode: Literal["crop", "fill", "stretch"] = Field(
        "crop", description="img2img: how the input meets width x height."
    )
    scale: float = Field(2.0, description="upscale: the factor, 1..8.")
    tile: int = Field(1024, description="upscale: tile side (multiple of 8, ≥ 64).")
    tile_overlap: int = Field(128, description="upscale: overlap of neighbouring tiles (multiple of 8).")
    # A quota instead of `n` (app/quota.py `RequestQuota`): render until this many are accepted.
    accepted_per_row: int | None = Field(
        None, ge=1, le=64, description="Render until this many images are accepted (QC), instead of n."
    )
    max_attempts: int | None = Field(None, ge=1, le=256, description="With accepted_per_row: at most this many images.")
    review_counts_as_accepted: bool = False
    max_cost_usd: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="No new round of images once the next would cross this cost."
    )


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
    mode: str = "txt2img"
    strength: float | None = None  # image-conditioned modes
    input_sha256: str | None = None  # the input image's, as stored under inputs/ in the output


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    combination: str
    seconds: float
    quota: dict[str, Any] | None = None  # with accepted_per_row or max_cost_usd: accepted, attempts, why short


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
    moderation: Literal["auto", "low"] | None = Field(
        None,
        description="Accepted; the server's own policy applies either way: prompts screened before rendering "
        "(a blocked one is a 400 `moderation_blocked`), NSFW graded by QC. A client cannot lower it.",
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="Refused: a combination (model) decides the look."
    )
    user: str | None = None


class OpenAIEditRequest(_Body):
    """`images.edit`'s fields other than the files (`image`, `mask`), as its multipart form sends
    them. Like generations: each is honoured or refused with a 400 naming it."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, description="auto (the input's own size) or WIDTHxHEIGHT.")
    quality: Literal["low", "medium", "high", "auto", "standard", "hd"] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = Field(None, description="false only: images are sent when finished.")
    user: str | None = None


# --- AUTOMATIC1111 --api --------------------------------------------------------------------------------


class A1111Txt2Img(BaseModel):
    # A1111 clients send many fields this server does not use (hires fix, restore faces, …): ignored.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

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


class A1111Img2Img(A1111Txt2Img):
    """`/sdapi/v1/img2img`: txt2img's fields and the init image's. How each maps is in
    `Ingress.a1111_img2img`; fields A1111 has and this server does not use are ignored, as in
    txt2img, except those that change what is rendered, which are refused or reported in `info`."""

    init_images: list[str] = Field(default_factory=list, description="base64 images (data URLs too); one is used.")
    mask: str | None = Field(None, description="white = repaint (inpainting_mask_invert=1: black).")
    denoising_strength: float = Field(0.75, description="(0, 1]")
    mask_blur: int = Field(4, description="0..64")
    # A1111's own defaults; what is rendered otherwise than asked is said in `info`.
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original (what is rendered), 2, 3 latent")
    inpaint_full_res: bool = Field(True, description="'Only masked': not supported, reported in info.")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize, 1 crop and resize, 2 resize and fill")
    include_init_images: bool = False


class A1111PngInfo(BaseModel):
    image: str  # base64, optionally a data: URL
