"""The generator-backend interface: render requests → images + lineage.

The diffusers generator and the remote ones (an AUTOMATIC1111 farm, Stability's REST API,
OpenAI-compatible image servers) answer the same call, so QC, post-processing, catalog, resume and
cost stay one code path whichever makes the pixels.

A backend never raises for one bad row: a content refusal, a malformed body or a transient fault
that outlasted its retries comes back as a `BackendResult` with `error` set. It raises only when
the whole run should stop: a rejected credential (`kind="auth"`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from app.backends.prices import api_price_usd
from app.conditioning.errors import ConditioningError
from app.conditioning.measures import Measures
from app.conditioning.plan import Prepared, finish, prepare, reload_inputs
from app.request import RenderRequest

BACKENDS = ("diffusers", "a1111", "stability", "openai")
REMOTE_BACKENDS = BACKENDS[1:]

ErrorKind = Literal["refused", "auth", "transient", "bad_response", "invalid"]


class BackendError(Exception):
    """A backend's failure, in the service's own terms.

    kind: refused (the provider's content filter; `message` is its reason), auth (401/403: the run
    stops), transient (5xx, 429, timeouts, refused connections: retried), bad_response (an answer
    that does not hold an image), invalid (a request the provider cannot take).
    `retry_after` is the server's `Retry-After` in seconds, when it sent one.
    """

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float | None = None, status: int | None = None):
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.retry_after = retry_after
        self.status = status
        self.attempts = 1  # set by the retry policy when it gives up

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class BackendConfig:
    """One combination's backend, as the spec names it (never the secret itself)."""

    backend: str = "diffusers"
    endpoints: tuple[str, ...] = ()
    model: str | None = None  # the provider's model / engine id (a1111 checkpoint, stability core|ultra|sd3…)
    max_concurrency: int = 4  # requests in flight at once, per actor
    credentials: str | None = None  # "env:NAME" or "file:/path/to/secret"
    timeout_s: float = 120.0
    max_attempts: int = 4  # per request, transient faults only
    backoff_s: float = 0.5  # first retry's wait; doubles, with jitter, up to max_backoff_s
    max_backoff_s: float = 20.0
    cooldown_s: float = 30.0  # a dead farm endpoint is tried again after this long
    price_usd_per_image: float | None = None  # None: the price table's default for backend + model

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, not {self.backend!r}")
        object.__setattr__(self, "endpoints", tuple(str(e).rstrip("/") for e in self.endpoints))
        for e in self.endpoints:
            parts = urlsplit(e)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"endpoints: {e!r} is not an http(s) URL like http://127.0.0.1:7860")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {self.max_concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.backend == "a1111" and not self.endpoints:
            raise ValueError("backend a1111 needs endpoints: [http://host:7860, ...]")
        if self.credentials is not None and not self.credentials.startswith(("env:", "file:")):
            raise ValueError("credentials must name where the key is, 'env:VAR' or 'file:/path', never the key itself")


@dataclass(frozen=True)
class Lineage:
    """Where an image came from. Recorded in the catalog next to the request's own fields."""

    backend: str
    endpoint_host: str | None = None  # host[:port] only: never a path, a query or credentials
    provider_model: str | None = None
    request_id: str | None = None
    seed: int | None = None  # the seed the provider says it used
    reproducible: bool = True  # False: the same request need not give the same bytes again
    unhonoured: tuple[str, ...] = ()  # request fields this provider could not apply

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "endpoint_host": self.endpoint_host,
            "provider_model": self.provider_model,
            "request_id": self.request_id,
            "seed": self.seed,
            "reproducible": self.reproducible,
            "unhonoured": list(self.unhonoured),
        }


@dataclass
class BackendResult:
    image_id: str
    image: np.ndarray | None  # [H, W, 3] uint8; None when `error` is set
    lineage: Lineage
    wall_s: float = 0.0  # request to answer, retries included
    device_s: float | None = None  # device time where the backend knows it (remote ones do not)
    cost_usd: float = 0.0  # the provider's price for this image (0 for a failed one unless charged)
    attempts: int = 1
    error: BackendError | None = None
    measures: Measures | None = None  # image-conditioned requests: kept-region and seam measures

    @property
    def ok(self) -> bool:
        return self.error is None


class Backend(Protocol):
    name: str

    def preflight(self) -> None:
        """One cheap authenticated call; raises BackendError(kind="auth") on a rejected key."""

    def render(self, requests: list[RenderRequest]) -> list[BackendResult]:
        """One result per request, in order."""

    def close(self) -> None: ...


def prepared_inputs(request: RenderRequest, where: str) -> Prepared:
    """The request's inputs read again (sha256 checked) and prepared; a bad one fails the row."""
    assert request.conditioning is not None
    try:
        image, mask = reload_inputs(request.conditioning)
        return prepare(request.conditioning, image, mask, request.width, request.height)
    except ConditioningError as e:
        raise BackendError("invalid", f"{where}: bad_input: {e}") from None


def completed(result: BackendResult, prepared: Prepared) -> BackendResult:
    """The provider's answer finished like the diffusers generator's: at the render size, kept
    pixels pasted back, measured."""
    if result.image is None:
        return result
    pixels = result.image
    width, height = prepared.render_size
    if pixels.shape[:2] != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))
        if "width" not in result.lineage.unhonoured:
            result.lineage = replace(result.lineage, unhonoured=(*result.lineage.unhonoured, "width", "height"))
    result.image, result.measures = finish(prepared, np.ascontiguousarray(pixels))
    return result


def endpoint_host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2]  # never user:password@


@dataclass
class RemoteBackend:
    """Shared by the HTTP backends: bounded concurrency, timing, per-row failures."""

    config: BackendConfig
    name: str = field(init=False, default="remote")

    def render(self, requests: list[RenderRequest]) -> list[BackendResult]:
        # At most max_concurrency requests are in flight from this actor at once.
        with ThreadPoolExecutor(max_workers=min(self.config.max_concurrency, max(1, len(requests)))) as pool:
            return list(pool.map(self._render_timed, requests))

    def _render_timed(self, request: RenderRequest) -> BackendResult:
        start = time.perf_counter()
        try:
            if request.conditioning is None:
                result = self.render_one(request)
            else:
                prepared = prepared_inputs(request, self.name)
                result = completed(self.render_conditioned(request, prepared), prepared)
        except BackendError as e:
            if e.kind == "auth":
                raise
            result = BackendResult(request.image_id, None, self.failed_lineage(request), attempts=e.attempts, error=e)
        result.wall_s = time.perf_counter() - start
        return result

    def render_one(self, request: RenderRequest) -> BackendResult:
        raise NotImplementedError

    def render_conditioned(self, request: RenderRequest, prepared: Prepared) -> BackendResult:
        """An image-conditioned request (app/backends/conditioned.py): the provider's answer at
        any size; the caller finishes it. A backend without image inputs refuses the row."""
        mode = request.conditioning.mode if request.conditioning else "txt2img"
        raise BackendError("invalid", f"{self.name}: the {self.name} backend takes no input image (mode {mode})")

    def failed_lineage(self, request: RenderRequest) -> Lineage:
        return Lineage(backend=self.name, provider_model=self.config.model, reproducible=False)

    def price(self) -> float:
        return api_price_usd(self.config.backend, self.config.model, self.config.price_usd_per_image)

    def preflight(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
