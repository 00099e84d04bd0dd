"""What the Serve app serves and how much it accepts: one validated, frozen config.

`imagefab serve --config serve/imagefab.yaml`; every field has a default, so no file is needed
for the tiny models on one machine.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.conditioning.loading import InputLimits
from app.postprocess import PostprocessSettings
from app.provenance.settings import ProvenanceSettings, RightsSpec, ScreeningSettings
from app.qc import QcSettings
from app.serve.shutdown import DEFAULT_GRACE_S
from app.spec import (
    Combination,
    ComputeSpec,
    SchedulerName,
    SpecError,
    _format_errors,
    check_compiled_stacks,
    with_defaults,
)

API_KEYS_ENV = "IMAGEFAB_API_KEYS"  # comma-separated
OpenAIQuality = Literal["low", "medium", "high", "auto", "standard", "hd"]
QUALITY_STEPS: dict[OpenAIQuality, float] = {
    "low": 0.5,
    "medium": 0.75,
    "high": 1.0,
    "auto": 1.0,
    "standard": 1.0,
    "hd": 1.5,
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Frozen):
    """Requests past these get a 422 naming the field, before any GPU work."""

    max_prompt_chars: int = Field(2000, ge=1)
    max_images: int = Field(8, ge=1, le=64)  # n, or batch_size x n_iter
    max_side: int = Field(2048, ge=64, le=4096)
    max_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_steps: int = Field(100, ge=1, le=500)
    # A whole request body: JSON with base64 images, a multipart upload, a png-info image.
    max_body_bytes: int = Field(32 << 20, ge=1024)
    # Each input image (img2img, inpaint, outpaint, upscale; OpenAI edits, A1111 img2img): its file's
    # bytes, its pixels (from the header, before decoding) and its format.
    max_upload_bytes: int = Field(10 << 20, ge=1024)
    max_upload_pixels: int = Field(4096 * 4096, ge=64 * 64)
    upload_formats: tuple[Literal["PNG", "JPEG", "WEBP"], ...] = ("PNG", "JPEG", "WEBP")
    body_timeout_s: float = Field(30.0, gt=0)  # a body not complete by then: 408 (slow or stalled uploads)
    max_in_flight: int = Field(32, ge=1)  # per ingress replica; past it: 503 + Retry-After
    # Free bytes the output store's disk keeps: below it, requests that would write images are
    # refused with 507 before any work (the writes of requests already admitted may use the
    # reserve, so they finish). 0: no reserve. Object stores have no free space to read: unchecked.
    min_free_bytes: int = Field(256 << 20, ge=0)
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _uploads(self) -> Limits:
        if not self.upload_formats:
            raise ValueError("upload_formats: at least one of PNG, JPEG, WEBP")
        return self

    def input_limits(self) -> InputLimits:
        return InputLimits(
            max_bytes=self.max_upload_bytes, max_pixels=self.max_upload_pixels, formats=tuple(self.upload_formats)
        )


class Batching(_Frozen):
    max_batch_size: int = Field(8, ge=1, le=64)
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=5.0)


class Replicas(_Frozen):
    """Generator replicas per base model (autoscaled between min and max)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    max_models_per_replica: int = Field(4, ge=1)  # LoRA combinations kept loaded per replica


class JobsSettings(_Frozen):
    """Asynchronous jobs (app/asyncjobs): the runner the server starts, and the queue's limits."""

    runner: bool = True  # a single-replica deployment that starts and follows queued jobs
    tick_s: float = Field(1.0, gt=0, le=60)  # how often the runner looks at the queue
    # The Ray dashboard jobs are submitted through: this, else $RAY_DASHBOARD_ADDRESS, else the
    # dashboard of the cluster the server runs on.
    ray_dashboard: str | None = None
    python: str | None = None  # the interpreter a job's driver runs: default the server's own
    runtime_env: dict[str, Any] | None = None  # Ray runtime env of each job, e.g. {"working_dir": "."}
    # Loopback/private webhook targets (also $IMAGEFAB_WEBHOOK_ALLOW_PRIVATE=1): off, against SSRF.
    allow_private_webhooks: bool = False
    # The bulk lane (app/asyncjobs/queue.py): GPUs kept for Serve's generators, which bulk jobs never
    # take. 0: none kept, bulk specs run as written. Above 0: each bulk generator also needs one unit
    # of `bulk_resource`, which the cluster declares for its other GPUs only, and a job's generators
    # are capped at cluster GPUs − serve_gpus. `cluster_gpus` None: counted when the server starts.
    serve_gpus: int = Field(0, ge=0)
    cluster_gpus: int | None = Field(None, ge=0)
    bulk_resource: str = Field("gpu_bulk", min_length=1)
    max_running: int = Field(1, ge=1)
    max_in_flight_per_key: int = Field(4, ge=1)
    max_rows_per_job: int = Field(10_000, ge=1)
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)


class ServeConfig(_Frozen):
    combinations: dict[str, Combination] = {"default": Combination(loras=())}
    default_combination: str | None = None  # None: the first listed
    steps: int = Field(30, ge=1, le=500)  # defaults for combinations that set none
    guidance: float = Field(5.0, ge=0.0, le=50.0)
    scheduler: SchedulerName = "euler"
    default_size: str = "tiny-square"
    models_catalog: str | None = None
    qc: QcSettings = QcSettings()
    postprocess: PostprocessSettings = PostprocessSettings()
    output_uri: str = "outputs"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: tuple[str, ...] = ()
    public_url: str | None = None  # how clients reach this server, for `url` responses
    # Image URLs in responses are signed (no API key needed to fetch them) and expire after url_ttl_s.
    # The secret: this, else $IMAGEFAB_URL_SECRET, else one generated into the output store.
    url_secret: str | None = None
    url_ttl_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    # OpenAI `quality` -> a factor on the combination's steps (rounded, at least 1, at most limits.max_steps).
    quality_steps: dict[OpenAIQuality, float] = Field(default_factory=lambda: dict(QUALITY_STEPS))
    # OpenAI edits of an opaque image without a mask: the whole image is redrawn, guided by it
    # (img2img at this strength; a mask or transparency makes it an inpaint instead).
    edit_strength: float = Field(0.85, gt=0.0, le=1.0)
    limits: Limits = Limits()
    # Ctrl-C or SIGTERM: no new requests; those in flight get this long to finish, then the replicas
    # are stopped hard. The server is gone within this plus a few seconds (app/serve/shutdown.py).
    shutdown_grace_s: float = Field(DEFAULT_GRACE_S, ge=0, le=3600)
    jobs: JobsSettings = JobsSettings()
    batching: Batching = Batching()
    replicas: Replicas = Replicas()
    compute: ComputeSpec = ComputeSpec()
    # Every served master and variant: a signed C2PA manifest and the invisible watermark (as in
    # bulk runs); usage rights in the catalog, XMP and manifest; prompts screened before rendering.
    provenance: ProvenanceSettings = ProvenanceSettings()
    rights: RightsSpec | None = None
    screening: ScreeningSettings = ScreeningSettings()

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if not self.combinations:
            raise ValueError("combinations: at least one is needed")
        if self.default_combination and self.default_combination not in self.combinations:
            raise ValueError(
                f"default_combination: no combination '{self.default_combination}' "
                f"(combinations: {', '.join(self.combinations)})"
            )
        if any(len(k) < 16 for k in self.api_keys):
            raise ValueError("api_keys: each key needs at least 16 characters")
        if self.url_secret is not None and len(self.url_secret) < 16:
            raise ValueError("url_secret: needs at least 16 characters")
        if any(not 0 < f <= 10 for f in self.quality_steps.values()):
            raise ValueError("quality_steps: each factor is in (0, 10]")
        check_compiled_stacks(self.combinations, self.compute, every=True)
        return self

    @property
    def default(self) -> str:
        return self.default_combination or next(iter(self.combinations))

    def effective_combinations(self) -> dict[str, Combination]:
        return with_defaults(self.combinations, self.steps, self.guidance, self.scheduler)

    def keys(self) -> tuple[str, ...]:
        """Configured keys plus those in $IMAGEFAB_API_KEYS."""
        env = tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())
        return self.api_keys + env

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def check_bind(self, host: str | None = None) -> None:
        """A server reachable from other machines never runs without keys. `host`: the address
        actually bound when Serve's own `http_options` decide it; default: this config's `host`."""
        host = host or self.host
        if not is_loopback(host) and not self.keys():
            raise SpecError(
                f"host: binding to {host} (not loopback) needs API keys: set api_keys in the config or ${API_KEYS_ENV}"
            )


def load_serve_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    data: dict = {}
    where = "serve config"
    if path:
        p = Path(path)
        where = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"{p}: cannot read serve config ({e})") from None
        if not isinstance(data, dict):
            raise SpecError(f"{p}: a serve config is a YAML mapping")
        if data.get("models_catalog") and not Path(data["models_catalog"]).is_absolute():
            data["models_catalog"] = str(p.resolve().parent / data["models_catalog"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_errors(e, where)) from None
