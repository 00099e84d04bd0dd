"""The Ray Serve application: a FastAPI ingress and one generator deployment per base model.

    imagefab serve [--config serve/imagefab.yaml]          local: 127.0.0.1:8000
    serve run serve/serve_config.yaml                        the same, through Ray Serve's CLI

Generators batch concurrent requests (`@serve.batch`) and are multiplexed by LoRA combination
(`@serve.multiplexed`), so requests for a stack land where it is loaded. The ingress translates
the native, OpenAI and AUTOMATIC1111 dialects into `ImageJob`s (app/serve/core.py), checks keys
and limits before any GPU work, and runs QC, post-processing and the catalog append.

(No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations
at run time, and Serve's ingress wrapping loses the module globals needed to resolve strings.)
"""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from app.asyncjobs.http import JobsService, jobs_service
from app.asyncjobs.http import router as jobs_router
from app.asyncjobs.records import JobStore
from app.generator import Generator
from app.metadata import parse_infotext, read_metadata
from app.models.catalog import ResolvedModel
from app.qc import QcSettings
from app.quota import RequestQuota
from app.request import RenderRequest
from app.schedulers import SCHEDULERS
from app.serve.bodies import BodyError, BodyGuard, BodyRules, is_json, strict_json, text_parameters
from app.serve.config import ServeConfig, load_serve_config
from app.serve.core import (
    A1111_SAMPLERS,
    A1111_SCHEDULES,
    A1111Task,
    ImageInput,
    ImageJob,
    RequestError,
    ServeCore,
    a1111_progress_report,
    a1111_schedule_label,
    a1111_scheduler,
    mode_settings,
    rendered_rows,
    resolve_serve_models,
    split_lora_tags,
)
from app.serve.heap import HeapTrimmer, allocator_env
from app.serve.jobrunner import JobRunnerServer, allow_private_webhooks, queue_policy, ray_jobs, sized_lane
from app.serve.metrics import MetricsHub
from app.serve.schemas import (
    A1111Img2Img,
    A1111PngInfo,
    A1111Txt2Img,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    OpenAIEditRequest,
    OpenAIImageRequest,
)
from app.serve.shutdown import drain_options
from app.serve.uploads import FormPart, parse_form
from app.serve.urls import UrlSignatureError, UrlSigner, url_secret
from app.spec import ComputeSpec, Size
from app.storage import OutputStore, StorageError, is_storage_full

logger = logging.getLogger("imagefab.serve")
OPENAI_ROUTES = {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/files/images/{name}"}
IMAGE_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
A1111_RESIZE_MODES = {0: "stretch", 1: "crop", 2: "fill"}  # just resize, crop and resize, resize and fill
A1111_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}

api = FastAPI(
    title="imagefab",
    description="SDXL image generation with QC and a catalog: native, OpenAI Images and AUTOMATIC1111 APIs.",
    version="0.1.0",
    dependencies=[Depends(text_parameters)],  # no NUL in a query or path parameter (app/serve/bodies.py)
    responses={"4XX": {"model": ErrorResponse, "description": "Refused: the field at fault and why"}},
)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class GeneratorServer:
    """One base model's pipeline; batches requests and keeps recently used LoRA stacks loaded.

    `clip`: the QC settings when CLIP runs on the generator (`build_app` decides): the replica
    then measures each image it renders on its own device, and the ingress grades the numbers."""

    def __init__(
        self,
        base: ResolvedModel,
        loras: dict[str, ResolvedModel],
        compute: ComputeSpec,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        clip: QcSettings | None = None,
    ):
        self.generator = Generator(base, loras, compute)
        self.clip = None
        if clip is not None:
            from app.qc.clip_stage import ClipMeasurer

            self.clip = ClipMeasurer(clip, self.generator.device.type)
        # @serve.batch adds these setters to the method, but its typing keeps the plain signature
        self.render_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.render_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.calls = 0
        self.images = 0
        self.combinations_seen: dict[str, int] = {}

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, combination_key: str) -> str:
        # LoRA adapters are loaded by the generator's own cache on first use; multiplexing only
        # tells the router which replica has which stack warm.
        return combination_key

    async def render(self, request: RenderRequest) -> dict:
        await self.get_model(serve.get_multiplexed_model_id())
        return await self.render_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def render_batch(self, reqs: list[RenderRequest]) -> list[dict]:
        # The pipeline call (and CLIP's, when it runs here) blocks: run it off the event loop so health
        # checks keep answering.
        out = await asyncio.to_thread(
            lambda: rendered_rows(reqs, self.generator.render(reqs), self.generator.accelerator_settings, self.clip)
        )
        self.calls += 1
        self.images += len(reqs)
        for q in reqs:
            self.combinations_seen[q.combination_key] = self.combinations_seen.get(q.combination_key, 0) + 1
        return out

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            "images": self.images,
            "combinations": dict(self.combinations_seen),
            "pid": os.getpid(),  # the replica's process, for operators (and the replica-kill test)
            **self.generator.stats(),
        }

    def check_health(self) -> None:
        if self.generator.pipe is None:
            raise RuntimeError("pipeline not loaded")


_OPENAI_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "invalid_signature",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "input_changed",
    413: "request_too_large",
    415: "unsupported_image_format",
    503: "server_busy",
    504: "timeout",
    507: "insufficient_storage",
}
# Where the field says more than the status: an unknown model; a body of the wrong Content-Type.
_OPENAI_FIELD_CODES = {(404, "model"): "model_not_found", (415, "content-type"): "unsupported_media_type"}


def _error(
    status: int,
    message: str,
    field: str | None = None,
    headers: dict | None = None,
    openai: bool = False,
    code: str | None = None,
) -> JSONResponse:
    """`{"error": {message, type, param, code}}`. In the OpenAI dialect as OpenAI answers: a request
    it cannot serve is a 400 (not 422), and `code` is a string (`invalid_value`, `model_not_found`…);
    the official client then raises `BadRequestError`, `NotFoundError`… with `param` set.
    Text from the request (a field name, a value) may hold lone surrogates: escaped, so the answer
    can always be encoded."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    field = field.encode("utf-8", "backslashreplace").decode("utf-8") if field else field
    if openai:
        status = 400 if status == 422 else status
        shown: int | str | None = code or _OPENAI_FIELD_CODES.get((status, field or ""), _OPENAI_CODES.get(status))
    else:
        shown = status
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": field,
            "code": shown,
        }
    }
    return JSONResponse(status_code=status, content=body, headers=headers)


def _openai_output(body) -> tuple[str, int | None]:
    """(format, encoder quality) of an Images API request; what cannot be honoured is a 400."""
    if body.background == "transparent":
        raise RequestError(
            400, "background", "'transparent' cannot be rendered: SDXL renders no alpha; use 'opaque' or 'auto'"
        )
    fmt = body.output_format or "png"
    if body.output_compression is not None and fmt == "png":
        raise RequestError(400, "output_compression", "applies to output_format jpeg or webp, not png")
    return fmt, None if fmt == "png" else max(1, 100 if body.output_compression is None else body.output_compression)


def _conditioning_summary(request: RenderRequest | None) -> dict:
    """What an image started from, for imagefab's extension of an answer: the mode, its strength
    and the stored input's sha256 (the catalog holds the rest)."""
    cond = request.conditioning if request is not None else None
    if cond is None:
        return {"mode": "txt2img"}
    return {"mode": cond.mode, "strength": cond.strength, "input_sha256": cond.image_sha256}


def _openai_size(size: str) -> tuple[int, int]:
    try:
        parsed = Size.parse(size)
    except ValueError as e:
        raise RequestError(400, "size", str(e)) from None
    return parsed.width, parsed.height


def _edit_form_schema() -> dict:
    """The OpenAPI schema of `/v1/images/edits`' multipart form (read by hand, see the route)."""
    schema = OpenAIEditRequest.model_json_schema()
    schema["properties"] = {
        "image": {"type": "string", "format": "binary", "description": "The image to edit: PNG, JPEG or WebP."},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "Optional; its transparent pixels mark what to edit (same size as the image).",
        },
        **schema["properties"],
    }
    schema["required"] = ["image", "prompt"]
    return schema


def _route_of(scope) -> str:
    """The route template a request matched (bounded label values), or `unmatched`."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


def _is_openai(scope) -> bool:
    return _route_of(scope) in OPENAI_ROUTES


_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def _invalid(error: dict, openai: bool) -> tuple[str | None, str]:
    """One of FastAPI's validation errors as (the field, a sentence naming it). Values are shown by
    repr: a raw value (NaN, a surrogate) could not be rendered as JSON."""
    loc = [str(part) for part in error.get("loc", ())]
    param = ".".join(loc[1:] if loc and loc[0] in _LOCATIONS else loc) or None
    kind, msg, name = error.get("type"), error.get("msg", ""), param or "body"
    if openai and kind == "extra_forbidden":
        return param, f"Unknown parameter: '{name}'."
    if openai and kind == "missing":
        return param, f"Missing required parameter: '{name}'."
    if openai:
        return param, f"Invalid value for '{name}': {repr(error.get('input'))[:80]}. {msg}".strip()
    if kind in ("extra_forbidden", "missing"):
        return param, f"{name}: {msg.lower()}"
    return param, f"{name}: {msg} (got {repr(error.get('input'))[:80]})"


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    """FastAPI's own checks (types, ranges, unknown fields) in the app's error shape, naming the
    field: 422, or 400 in the OpenAI dialect as OpenAI answers. A body that is not a JSON object
    (missing, a list) is a 400, as one that is not JSON; one FastAPI did not read as JSON because
    of its Content-Type is a 415 saying so."""
    openai = _is_openai(request.scope)
    errors = exc.errors() or [{}]
    param, message = _invalid(errors[0], openai)
    content_type = request.headers.get("content-type")
    if param is None and errors[0].get("type") != "missing" and not is_json(content_type):
        return _error(
            415,
            f"Content-Type {content_type or '(none)'}: this route reads a JSON body (application/json)",
            "content-type",
            openai=openai,
        )
    if param is None:  # the body as a whole
        return _error(400, message, None, openai=openai)
    if len(errors) > 1 and not openai:
        message = "; ".join([message, *(_invalid(e, openai)[1] for e in errors[1:5])])
    return _error(400 if openai else 422, message, param, openai=openai)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """Every other refusal in the same shape: a body `BodyGuard` refused (too large, too slow, not
    strict JSON: `param` names the field), an unknown path (404) or method (405), a body FastAPI
    could not parse (400)."""
    scope = request.scope
    if isinstance(exc, BodyError):
        message, field = exc.detail, exc.field
    elif exc.status_code == 404 and "route" not in scope:
        message, field = f"no route {request.method} {request.url.path} (GET /docs lists them)", None
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message, field = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})", None
    else:
        message, field = str(exc.detail), None
    return _error(exc.status_code, message, field, headers=dict(exc.headers or {}), openai=_is_openai(scope))


@api.exception_handler(StorageError)
async def _storage_error(request: Request, exc: StorageError):
    """The output store failing under any route (images, uploads, the catalog, job records): 507
    when it has no space left (a full disk or quota, or below `limits.min_free_bytes`), else 503.
    Either way nothing half-written is left where a reader looks (app/storage.py), and the
    request can be sent again once the store has room (Retry-After)."""
    store = _ingress().core.output.uri
    logger.error("%s %s: output store %s: %s", request.method, request.url.path, store, exc)
    if is_storage_full(exc):
        message = f"the output store {store} has no space left ({exc}); send the request again once space is freed"
        return _error(507, message, headers={"Retry-After": "60"}, openai=_is_openai(request.scope))
    message = f"the output store {store} cannot be written or read ({exc}); send the request again later"
    return _error(503, message, headers={"Retry-After": "10"}, openai=_is_openai(request.scope))


# A generator replica that died (killed, out of memory, its node lost) with this request on it, or
# none ready to take it: Serve starts a replacement, so the request can be sent again.
GENERATOR_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)


async def _generator_gone(request: Request, exc: Exception):
    logger.warning("%s %s: generator unavailable: %s", request.method, request.url.path, exc)
    message = (
        f"the image generator is unavailable ({type(exc).__name__}: a replica stopped or is starting); "
        "send the request again shortly"
    )
    return _error(503, message, headers={"Retry-After": "5"}, openai=_is_openai(request.scope))


for _gone in GENERATOR_GONE:
    api.add_exception_handler(_gone, _generator_gone)


class _CountRequests:
    """Every answered HTTP request counted and timed, whatever answered it (a route, FastAPI's
    validation, a 404 for an unknown path), reported by the ingress replica that served it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            ingress = serve.get_replica_context().servable_object
            ingress.report("request", _route_of(scope), status, time.perf_counter() - t0)


api.add_middleware(_CountRequests)
# Job submissions and batch files are as large as the jobs policy allows; other bodies, max_body_bytes.
JOB_ROUTES = {route.path for route in jobs_router.routes if hasattr(route, "path")}


def _ingress() -> Any:
    """The Ingress replica serving this request (what module-level handlers reach it through)."""
    return serve.get_replica_context().servable_object


def _body_rules(scope) -> BodyRules:
    return _ingress().body_rules(_route_of(scope))


# Every body is read through BodyGuard: a size and time limit, and strict JSON (app/serve/bodies.py).
api.add_middleware(BodyGuard, rules=_body_rules)
# Asynchronous jobs and OpenAI's Batch API (app/asyncjobs): the routes reach this replica's service.
api.include_router(jobs_router)


def _replica_jobs() -> JobsService:
    ingress: Any = serve.get_replica_context().servable_object
    return ingress.jobs


api.dependency_overrides[jobs_service] = _replica_jobs


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: ServeConfig,
        models,
        generators: dict,
        metrics_hub=None,
        clip_on_generator: bool = False,
        job_runner=None,
    ):
        self.config = config
        self.models = models
        self.core = ServeCore(config, models, clip_on_generator=clip_on_generator)
        self.generators = generators  # base model name -> DeploymentHandle
        self.hub = metrics_hub  # MetricsHub handle (None: metrics are not kept)
        self.job_runner = job_runner  # JobRunnerServer handle (None: another process runs the jobs)
        # ServeConfig.keys() is a method (configured + $IMAGEFAB_API_KEYS), not a dict's keys: called
        # apart, so that no linter "simplifies" it into iterating the config.
        api_keys = config.keys()
        self.keys = tuple(k.encode() for k in api_keys)
        self.signer = UrlSigner(url_secret(self.core.output, config.url_secret), config.url_ttl_s)
        default = config.effective_combinations()[config.default]
        self.jobs = JobsService(
            JobStore(self.core.output),
            policy=queue_policy(config.jobs),
            keys=api_keys,
            allow_private_webhooks=allow_private_webhooks(config.jobs),
            ray_jobs=ray_jobs(config.jobs),
            batch_spec={"run_name": "batch", "combinations": {config.default: default.model_dump(mode="json")}},
            image_url=lambda row: self._image_url(f"{row['image_id']}.png"),
        )
        self.replica = uuid.uuid4().hex[:8]
        self.reports: set[asyncio.Task] = set()
        self.in_flight = 0
        # A1111 txt2img and img2img requests in flight, by caller: what POST /sdapi/v1/interrupt stops
        # and GET /sdapi/v1/progress reports.
        self.a1111_running: dict[str, list[A1111Task]] = {}
        self.started = time.time()
        self.heap = HeapTrimmer()  # memory freed by finished requests goes back to the OS when idle

    # --- metrics ----------------------------------------------------------------------------------
    def report(self, what: str, *args) -> None:
        """Tell the metrics hub, without making the request wait for it."""
        if self.hub is None:
            return

        async def send():
            try:
                await getattr(self.hub, what).remote(*args)
            except Exception as e:  # metrics never fail a request
                logger.warning("metrics report %s failed: %s", what, e)

        task = asyncio.get_running_loop().create_task(send())
        self.reports.add(task)
        task.add_done_callback(self.reports.discard)

    def _set_in_flight(self, count: int) -> None:
        self.in_flight = count
        self.report("in_flight", self.replica, count)

    def body_rules(self, route: str) -> BodyRules:
        """How large a route's body may be, and how long its arrival may take (`BodyGuard`)."""
        limits = self.config.limits
        most = self.jobs.policy.max_upload_bytes if route in JOB_ROUTES else limits.max_body_bytes
        return BodyRules(max_bytes=most, timeout_s=limits.body_timeout_s)

    # --- guards ---------------------------------------------------------------------------------
    def _token(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _authorized(self, request: Request) -> bool:
        if not self.keys:
            return True
        token = self._token(request)
        if token is None:
            return False
        given = token.encode()
        # Compare against every key without stopping early: time says nothing about which matched.
        return sum(hmac.compare_digest(given, k) for k in self.keys) > 0

    def _caller(self, request: Request) -> str:
        """Who is asking, for interrupting only one's own work: a digest of the key (never the key)."""
        return hashlib.sha256((self._token(request) or "").encode()).hexdigest()[:16] if self.keys else "anyone"

    async def _serve(self, request: Request, work, openai: bool = False, public: bool = False) -> Response:
        """Auth, size and backpressure checks, then `work()`, with errors mapped to the dialect's shape.
        `public`: the caller proved access another way (a signed URL), no key needed."""
        if not public and not self._authorized(request):
            return _error(
                401,
                "missing or wrong API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
                openai=openai,
            )
        # A chunked upload declares no length: count the bytes FastAPI has already read.
        length = int(request.headers.get("content-length") or 0) or len(await request.body())
        if length > self.config.limits.max_body_bytes:
            lim = self.config.limits
            return _error(
                413,
                f"body of {length} bytes; at most {lim.max_body_bytes} (this server's limits.max_body_bytes; "
                f"each input image may have {lim.max_upload_bytes} bytes, limits.max_upload_bytes)",
                openai=openai,
            )
        if self.in_flight >= self.config.limits.max_in_flight:
            self.report("rejected")
            return _error(
                503,
                f"server busy: {self.in_flight} requests in flight",
                headers={"Retry-After": "2"},
                openai=openai,
            )
        self._set_in_flight(self.in_flight + 1)
        try:
            return await asyncio.wait_for(work(), timeout=self.config.limits.request_timeout_s)
        except TimeoutError:
            return _error(504, f"no result within {self.config.limits.request_timeout_s} s", openai=openai)
        except RequestError as e:
            return _error(e.status, str(e), e.field, openai=openai, code=e.code)
        finally:
            self._set_in_flight(self.in_flight - 1)
            if self.in_flight == 0:
                self.heap.maybe_trim()

    async def _render(self, job: ImageJob, interrupt: asyncio.Event | None = None, task: A1111Task | None = None):
        """Plan, render on the base model's generators, then QC, post-process and catalog.

        With `interrupt`: once it is set, images not yet rendered are cancelled (a generator drops
        them if its batch has not started; one already rendering finishes there and is discarded),
        and only the rendered ones are finished and returned. `task`: counts the images back so far."""
        requests = self.core.plan(job)
        await asyncio.to_thread(self.core.check_space)  # below the disk reserve: 507 before any work
        if task is not None:
            task.images, task.steps = len(requests), requests[0].steps
        if job.image_input is not None:  # planned and accepted: only now are its uploads written
            await asyncio.to_thread(self.core.store_inputs, job.image_input)
        base = requests[0].base_model["name"]
        handle = self.generators[base].options(multiplexed_model_id=requests[0].combination_key)
        responses = [handle.render.remote(q) for q in requests]
        if interrupt is None:
            results = await asyncio.gather(*responses)
        else:
            results = await self._until_interrupted(responses, interrupt, task)
            requests = [q for q, r in zip(requests, results, strict=True) if r is not None]
            results = [r for r in results if r is not None]
        images = await asyncio.to_thread(self.core.finish, requests, results) if requests else []
        self.report("images", [(im.status, im.request.combination if im.request else "") for im in images])
        return requests, images

    @staticmethod
    async def _until_interrupted(responses: list, interrupt: asyncio.Event, counted: A1111Task | None = None) -> list:
        """Each response's result, or None for those cancelled when `interrupt` was set first."""

        async def result_of(response):
            return await response

        tasks = [asyncio.ensure_future(result_of(r)) for r in responses]
        stop = asyncio.ensure_future(interrupt.wait())
        try:
            pending = set(tasks)
            while pending and not stop.done():
                _, pending = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop)
                if counted is not None:
                    counted.done = len(tasks) - len(pending)
        finally:  # interrupted, or this request itself cancelled (timeout): nothing left running for it
            stop.cancel()
            for response, task in zip(responses, tasks, strict=True):
                if not task.done():
                    response.cancel()
                    task.cancel()
        return [t.result() if t.done() and not t.cancelled() else None for t in tasks]

    def _image_url(self, name: str) -> str:
        """A signed URL of an image file, under `public_url` (relative without it)."""
        root = (self.config.public_url or "").rstrip("/")
        return f"{root}/v1/files/images/{name}?{self.signer.query(name, time.time(), None)}"

    def _url(self, request: Request, image_id: str, fmt: str = "png", quality: int | None = None) -> str:
        """A signed, expiring URL of an image: fetched without the API key until it expires."""
        root = self.config.public_url or str(request.base_url).rstrip("/")
        name = f"{image_id}.{fmt}"
        return f"{root.rstrip('/')}/v1/files/images/{name}?{self.signer.query(name, time.time(), quality)}"

    # --- native ---------------------------------------------------------------------------------
    @api.post("/v1/generate", response_model=GenerateResponse, tags=["native"])
    async def generate(self, body: GenerateRequest, request: Request):
        async def work():
            t0 = time.perf_counter()
            width, height = body.width, body.height
            if body.size:
                try:
                    size = Size.parse(body.size)
                except ValueError as e:
                    raise RequestError(422, "size", str(e)) from None
                width, height = size.width, size.height
            loras = None
            if body.loras is not None:
                try:
                    loras = [(str(lo["name"]), float(lo.get("weight", 1.0))) for lo in body.loras]
                except (KeyError, TypeError, ValueError, OverflowError):  # float(10**400): OverflowError
                    raise RequestError(422, "loras", "each entry is {name, weight}") from None
            image_input = await self._native_input(body)
            job = ImageJob(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                combination=body.combination,
                loras=loras,
                seed=body.seed,
                n=body.n,
                steps=body.steps,
                guidance=body.guidance,
                scheduler=body.scheduler,
                width=width,
                height=height,
                tags=body.tags,
                image_input=image_input,
            )
            try:
                quota = RequestQuota.of(
                    body.accepted_per_row, body.max_attempts, body.max_cost_usd, body.review_counts_as_accepted
                )
            except ValueError as e:
                raise RequestError(422, "max_attempts", str(e)) from None
            report = None
            if quota is None:
                requests, images = await self._render(job)
            else:  # rounds of images until the quota is met, the attempts are spent or the cap is reached
                requests, images, report = await quota.render(
                    lambda seed, n: self._render(replace(job, seed=seed, n=n)), body.seed, body.n
                )
            out = []
            for im in images:
                item = {
                    "image_id": im.image_id,
                    "seed": im.seed,
                    "status": im.status,
                    "reasons": im.reasons,
                    "scores": im.scores,
                    "width": im.width,
                    "height": im.height,
                    "uri": im.uri,
                    "error": im.error,
                    **_conditioning_summary(im.request),
                }
                if body.response_format == "url":
                    item["url"] = self._url(request, im.image_id) if im.png else None
                else:
                    item["b64_json"] = base64.b64encode(im.png).decode() if im.png else None
                out.append(item)
            combination = requests[0].combination if requests else job.combination or self.config.default
            seconds = round(time.perf_counter() - t0, 4)
            return JSONResponse(
                {"images": out, "combination": combination, "seconds": seconds}
                | ({"quota": report} if report is not None else {})
            )

        return await self._serve(request, work)

    async def _native_input(self, body: GenerateRequest) -> ImageInput | None:
        """`image` (+ `mask`) and the mode's settings of a native request; None for txt2img."""
        if body.image is None:
            if body.mode is not None or body.mask is not None:
                what = f"mode {body.mode}" if body.mode else "a mask"
                raise RequestError(422, "image", f"{what} needs an input image (base64 in `image`)")
            return None
        if body.mode is None:
            raise RequestError(422, "mode", "an input image needs a mode: img2img, inpaint, outpaint or upscale")
        settings = mode_settings(
            mode=body.mode,
            strength=body.strength,
            mask_blur=body.mask_blur,
            blend_px=body.blend_px,
            target=body.target or "",
            anchor=body.anchor,
            fill=body.fill,
            resize_mode=body.resize_mode,
            scale=body.scale,
            tile=body.tile,
            tile_overlap=body.tile_overlap,
        )
        image = await asyncio.to_thread(self.core.uploads.accept_base64, body.image, "image")
        mask = None
        if body.mask is not None:
            mask = await asyncio.to_thread(self.core.uploads.accept_base64, body.mask, "mask")
        return ImageInput(settings, image, mask)

    @api.get("/v1/models", tags=["native", "openai"])
    async def models_list(self, request: Request):
        async def work():
            created = int(self.started)
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "imagefab",
                    "kind": "combination",
                    "base": c.base,
                    "loras": [{"name": lo.name, "weight": lo.weight} for lo in c.loras],
                    "steps": c.steps,
                    "guidance": c.guidance,
                    "scheduler": c.scheduler,
                }
                for name, c in self.core.combos.items()
            ]
            default = self.core.combos[self.config.default]
            data += [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "imagefab",
                    "kind": "base",
                    "base": name,
                    "loras": [],
                    "steps": default.steps,
                    "guidance": default.guidance,
                    "scheduler": default.scheduler,
                }
                for name in self.core.model_ids()
                if name not in self.core.combos
            ]
            return JSONResponse({"object": "list", "data": data})

        return await self._serve(request, work, openai=True)

    @api.get("/v1/files/images/{name}", tags=["native", "openai"])
    async def image_file(
        self,
        name: str,
        request: Request,
        expires: str | None = None,
        sig: str | None = None,
        quality: int | None = None,
    ):
        """An image by id: `<id>.png` is the master; `.jpeg`/`.webp` its re-encoding (`quality`).
        With `expires` and `sig` (the URLs responses give) no API key is needed."""
        signed = expires is not None or sig is not None
        if signed:
            try:
                self.signer.check(name, expires, sig, quality, time.time())
            except UrlSignatureError as e:
                return _error(403, str(e), "sig", openai=True)

        async def work():
            image_id, _, fmt = name.rpartition(".")
            if fmt not in IMAGE_MEDIA:
                image_id, fmt = name, "png"
            if quality is not None and (fmt == "png" or not 1 <= quality <= 100):
                raise RequestError(400, "quality", "1..100, for .jpeg and .webp only")
            png = await asyncio.to_thread(self.core.read_image, image_id)
            data = await asyncio.to_thread(self.core.encoded, png, fmt, quality)
            return Response(content=data, media_type=IMAGE_MEDIA[fmt])

        return await self._serve(request, work, openai=True, public=signed)

    def _openai_job(self, body, width: int | None, height: int | None, image_input=None) -> ImageJob:
        """The ImageJob of an Images API request (generations, or edits with its `image_input`)."""
        choice = self.core.model_choice(body.model)
        return ImageJob(
            prompt=body.prompt,
            n=body.n,
            width=width,
            height=height,
            steps=self.core.steps_for_quality(choice, body.quality),
            tags={"user": body.user} if body.user else {},
            image_input=image_input,
            **choice,
        )

    # --- OpenAI Images API --------------------------------------------------------------------------
    @api.post("/v1/images/generations", tags=["openai"])
    async def openai_generations(self, body: OpenAIImageRequest, request: Request):
        async def work():
            # Fields imagefab cannot honour are refused, naming the field, before any work.
            if body.style is not None:
                raise RequestError(
                    400, "style", "not supported: the look comes from the model (a combination, GET /v1/models)"
                )
            fmt, encoder_quality = _openai_output(body)
            width = height = None
            if body.size and body.size != "auto":
                width, height = _openai_size(body.size)
            job = self._openai_job(body, width, height)
            requests, images = await self._render(job)
            return await self._openai_images(request, body, requests, images, fmt, encoder_quality)

        return await self._serve(request, work, openai=True)

    @api.post(
        "/v1/images/edits",
        tags=["openai"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": _edit_form_schema()}},
            }
        },
    )
    async def openai_edits(self, request: Request):
        """OpenAI's `images.edit`: one `image` file (PNG, JPEG or WebP), an optional `mask` whose
        transparent pixels mark what to edit, and the generations' fields. With a mask, or an image
        with transparency, the edit is an inpaint (everything else kept byte for byte, at the
        image's own size); an opaque image without a mask is redrawn whole, guided by it (img2img
        at the server's `edit_strength`)."""

        async def work():
            parts = parse_form(request.headers.get("content-type", ""), await request.body())
            files: dict[str, list[FormPart]] = {"image": [], "mask": []}
            values: dict[str, str] = {}
            for part in parts:
                name = "image" if part.name == "image[]" else part.name
                if name in files:
                    files[name].append(part)
                elif name in values:
                    raise RequestError(400, name, "is given more than once")
                else:
                    values[name] = part.text
            try:
                body = OpenAIEditRequest.model_validate(values)
            except ValidationError as e:
                first = e.errors()[0]
                param = ".".join(str(p) for p in first["loc"]) or None
                if first["type"] == "extra_forbidden":
                    raise RequestError(400, param or "body", f"Unknown parameter: '{param}'.") from None
                if first["type"] == "missing":
                    raise RequestError(400, param or "body", f"Missing required parameter: '{param}'.") from None
                raise RequestError(
                    400, param or "body", f"{first['msg']} (got {str(first.get('input'))[:80]!r})"
                ) from None
            if not files["image"]:
                raise RequestError(400, "image", "Missing required parameter: 'image' (the image file to edit).")
            if len(files["image"]) > 1:
                raise RequestError(
                    400, "image", f"this server edits one image per request; {len(files['image'])} were sent"
                )
            if len(files["mask"]) > 1:
                raise RequestError(400, "mask", "is given more than once")
            if body.stream:
                raise RequestError(400, "stream", "not supported: images are sent when finished; send false or omit it")
            fmt, encoder_quality = _openai_output(body)
            image = await asyncio.to_thread(self.core.uploads.accept, files["image"][0].data, "image")
            mask = None
            if files["mask"]:
                upload = await asyncio.to_thread(self.core.uploads.accept, files["mask"][0].data, "mask")
                mask = await asyncio.to_thread(self.core.uploads.alpha_mask, upload)
            alpha = image.image.alpha
            inpaint = mask is not None or (alpha is not None and bool((alpha < 128).any()))
            width = height = None
            own = f"{image.image.width}x{image.image.height}"
            if inpaint and body.size not in (None, "auto", own):
                raise RequestError(
                    400,
                    "size",
                    f"an edit with a mask or transparency keeps the image's own size, {own}: send that or 'auto'",
                )
            if not inpaint and body.size not in (None, "auto"):
                width, height = _openai_size(body.size)
            settings = (
                mode_settings(mode="inpaint")
                if inpaint
                else mode_settings(mode="img2img", strength=self.config.edit_strength, resize_mode="crop")
            )
            job = self._openai_job(body, width, height, ImageInput(settings, image, mask))
            requests, images = await self._render(job)
            return await self._openai_images(request, body, requests, images, fmt, encoder_quality)

        return await self._serve(request, work, openai=True)

    async def _openai_images(self, request: Request, body, requests, images, fmt: str, encoder_quality) -> Response:
        """The Images API's answer: `data` as b64_json or signed URLs, with imagefab's QC extension."""
        data = []
        for im in images:
            item: dict = {"revised_prompt": im.request.prompt}
            if not im.png:
                item["url" if body.response_format == "url" else "b64_json"] = None
            elif body.response_format == "url":
                item["url"] = self._url(request, im.image_id, fmt, encoder_quality)
            else:
                encoded = await asyncio.to_thread(self.core.encoded, im.png, fmt, encoder_quality)
                item["b64_json"] = base64.b64encode(encoded).decode()
            # imagefab's extension: which catalogued image this is and how QC judged it.
            item["imagefab"] = {
                "image_id": im.image_id,
                "qc_status": im.status,
                "qc_reasons": im.reasons,
                "seed": im.seed,
                "error": im.error or None,
                **_conditioning_summary(im.request),
            }
            data.append(item)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "output_format": fmt,
                "size": f"{requests[0].width}x{requests[0].height}",
                "background": "opaque",
                **({"quality": body.quality} if body.quality else {}),
            }
        )

    # --- AUTOMATIC1111 ------------------------------------------------------------------------------
    @api.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def a1111_txt2img(self, body: A1111Txt2Img, request: Request):
        return await self._serve(request, lambda: self._a1111(body, request))

    @api.post("/sdapi/v1/img2img", tags=["a1111"])
    async def a1111_img2img(self, body: A1111Img2Img, request: Request):
        """A1111's img2img. Without `mask`: img2img at width x height, the init image brought there
        by `resize_mode` (0 just resize = stretch, 1 crop and resize = crop, 2 resize and fill =
        fill; 3 latent upscale is refused). With `mask`: inpaint (white repaints;
        `inpainting_mask_invert` 1 repaints black) at the init image's own size, every kept pixel
        the init image's. What this server renders differently from A1111 is said in `info`'s
        `extra_generation_params`: `inpainting_fill` other than 1 (original), `inpaint_full_res`
        (only masked), and width x height with a mask."""

        async def work():
            image_input, notes = await self._a1111_input(body)
            return await self._a1111(body, request, image_input, notes)

        return await self._serve(request, work)

    async def _a1111_input(self, body: A1111Img2Img) -> tuple[ImageInput, dict[str, str]]:
        fields = {"image": "init_images", "strength": "denoising_strength"}
        if not body.init_images:
            raise RequestError(422, "init_images", "needs one init image (base64 or a data:image/…;base64, URL)")
        if len(body.init_images) > 1:
            raise RequestError(
                422, "init_images", f"this server renders from one init image per request; {len(body.init_images)} sent"
            )
        if body.resize_mode == 3:
            raise RequestError(
                422,
                "resize_mode",
                "3 (latent upscale) is not supported: send 0 (just resize), 1 (crop and resize) or 2 (resize and "
                "fill); for a second pass at a higher resolution, POST /v1/generate with mode upscale",
            )
        settings = mode_settings(
            fields,
            mode="inpaint" if body.mask else "img2img",
            strength=body.denoising_strength,
            mask_blur=body.mask_blur,
            resize_mode=A1111_RESIZE_MODES[body.resize_mode],
        )
        image = await asyncio.to_thread(self.core.uploads.accept_base64, body.init_images[0], "init_images")
        if not body.mask:
            return ImageInput(settings, image, None, fields), {}
        upload = await asyncio.to_thread(self.core.uploads.accept_base64, body.mask, "mask")
        mask = await asyncio.to_thread(self.core.uploads.a1111_mask, upload, bool(body.inpainting_mask_invert))
        notes = {}
        if body.inpainting_fill != 1:
            notes["imagefab inpainting_fill"] = (
                f"{A1111_FILLS[body.inpainting_fill]} is not rendered here: the masked area starts from the "
                "init image's own pixels (original), denoised at denoising_strength"
            )
        if body.inpaint_full_res:
            notes["imagefab inpaint_full_res"] = (
                "not supported: the whole image was inpainted at its own size, not only the masked area "
                "at width x height"
            )
        size = (image.image.width, image.image.height)
        if (body.width, body.height) != size:
            notes["imagefab size"] = (
                f"inpainting keeps the init image's size, {size[0]}x{size[1]}, so kept pixels stay where they "
                f"were; {body.width}x{body.height} was not applied"
            )
        return ImageInput(settings, image, mask, fields), notes

    async def _a1111(
        self,
        body: A1111Txt2Img,
        request: Request,
        image_input: ImageInput | None = None,
        notes: dict[str, str] | None = None,
    ) -> Response:
        """txt2img, or img2img with `image_input`: rendered, and answered as A1111 answers."""
        prompt, tag_loras = split_lora_tags(body.prompt)
        # The checkpoint: this request's override, else the server's (POST /sdapi/v1/options).
        checkpoint = body.override_settings.get("sd_model_checkpoint") or await asyncio.to_thread(
            self.core.a1111_checkpoint
        )
        combination, base = self.core.checkpoint_choice(str(checkpoint))
        combo = self.core.combos.get(combination or self.config.default)
        scheduler = a1111_scheduler(
            body.sampler_name or body.sampler_index,
            body.scheduler,
            (combo.scheduler if combo else None) or self.config.scheduler,
        )
        sized = image_input is None or image_input.settings.mode == "img2img"  # inpaint keeps its input's size
        job = ImageJob(
            prompt=prompt,
            negative_prompt=body.negative_prompt,
            combination=combination,
            base=base,
            loras=tag_loras or None,
            seed=body.seed,
            n=body.batch_size * body.n_iter,
            steps=body.steps,
            guidance=body.cfg_scale,
            scheduler=scheduler,
            width=body.width if sized else None,
            height=body.height if sized else None,
            image_input=image_input,
        )
        task = A1111Task(asyncio.Event(), time.time(), kind="img2img" if image_input else "txt2img")
        interrupt = task.interrupt
        running = self.a1111_running.setdefault(self._caller(request), [])
        running.append(task)
        try:
            requests, images = await self._render(job, interrupt, task)
        finally:
            running.remove(task)
        infotexts = [read_metadata(im.png).get("parameters", "") if im.png else "" for im in images]
        first = requests[0] if requests else None
        info = {
            "prompt": body.prompt,
            "all_prompts": [body.prompt] * len(images),
            "negative_prompt": body.negative_prompt,
            "seed": images[0].seed if images else body.seed,
            "all_seeds": [im.seed for im in images],
            "subseed": -1,
            "all_subseeds": [-1] * len(images),
            "steps": first.steps if first else body.steps,
            "cfg_scale": first.guidance if first else body.cfg_scale,
            "sampler_name": SCHEDULERS[first.scheduler][2] if first else body.sampler_name,
            "scheduler": a1111_schedule_label(first.scheduler) if first else body.scheduler,
            "width": first.width if first else body.width,
            "height": first.height if first else body.height,
            "sd_model_name": first.base_model["name"] if first else None,
            "sd_model_hash": first.base_model["sha256"][:10] if first else None,
            "batch_size": body.batch_size,
            "infotexts": infotexts,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "interrupted": interrupt.is_set(),
            "extra_generation_params": {
                "imagefab image_ids": [im.image_id for im in images],
                "imagefab qc": [im.status for im in images],
                "imagefab qc reasons": [im.reasons for im in images],
                **(notes or {}),
            },
        }
        parameters = body.model_dump()
        if isinstance(body, A1111Img2Img):
            cond = first.conditioning if first else None
            info.update(
                denoising_strength=cond.strength if cond else body.denoising_strength,
                mask_blur=body.mask_blur if body.mask else None,
                inpainting_fill=body.inpainting_fill,
                inpaint_full_res=body.inpaint_full_res,
                inpainting_mask_invert=body.inpainting_mask_invert,
                resize_mode=body.resize_mode,
                imagefab_mode=cond.mode if cond else None,
            )
            if not body.include_init_images:  # as A1111: the inputs are not sent back unless asked for
                parameters.update(init_images=None, mask=None)
        return JSONResponse(
            {
                "images": [base64.b64encode(im.png).decode() for im in images],
                "parameters": parameters,
                "info": json.dumps(info),
            }
        )

    @api.get("/sdapi/v1/scripts", tags=["a1111"])
    async def a1111_scripts(self, request: Request):
        """No A1111 scripts here (AUTOMATIC1111 clients ask at start-up which ones exist)."""

        async def work():
            return JSONResponse({"txt2img": [], "img2img": []})

        return await self._serve(request, work)

    @api.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def a1111_interrupt(self, request: Request):
        """Stops the caller's txt2img and img2img requests in flight on this replica (the caller: its
        API key). Each answers at once with the images already rendered; images a generator has not started
        are dropped; one it is rendering finishes there and is discarded. Answers `{}`, as A1111."""

        async def work():
            for task in self.a1111_running.get(self._caller(request), ()):
                task.interrupt.set()
            return JSONResponse({})

        return await self._serve(request, work)

    @api.get("/sdapi/v1/options", tags=["a1111"])
    async def a1111_options(self, request: Request):
        async def work():
            return JSONResponse(await asyncio.to_thread(self._a1111_options))

        return await self._serve(request, work)

    @api.post("/sdapi/v1/options", tags=["a1111"])
    async def a1111_set_options(self, request: Request):
        """`sd_model_checkpoint` (a base's title or name, or a combination) sets what the A1111
        dialect renders with when a request names none, for the whole server. Other keys are
        accepted only with the value GET reports: this server has no such setting to change."""

        async def work():
            body = strict_json(await request.body() or b"{}")  # BodyError: a 4xx naming the field
            if not isinstance(body, dict):
                raise RequestError(422, "body", "is a JSON object of options")
            current = await asyncio.to_thread(self._a1111_options)
            for key, value in body.items():
                if key != "sd_model_checkpoint" and current.get(key, object()) != value:
                    settable = "only sd_model_checkpoint can be set here"
                    shown = f"it is {current[key]!r}" if key in current else "no such option on this server"
                    raise RequestError(422, str(key)[:100], f"cannot be set ({shown}; {settable})")
            if "sd_model_checkpoint" in body:
                await asyncio.to_thread(self.core.set_a1111_checkpoint, body["sd_model_checkpoint"])
            return JSONResponse(None)

        return await self._serve(request, work)

    def _a1111_options(self) -> dict:
        checkpoint = self.core.a1111_checkpoint()
        combination, base = self.core.checkpoint_choice(checkpoint)
        combo = self.core.combos.get(combination or self.config.default)
        base_name = base or (combo.base if combo else None)
        sha = self.models.bases[base_name].sha256 if base_name in self.models.bases else ""
        return {
            "sd_model_checkpoint": checkpoint,
            "sd_checkpoint_hash": sha,
            "sd_vae": "Automatic",
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0,
            "imagefab_combination": combination,
        }

    @api.get("/sdapi/v1/schedulers", tags=["a1111"])
    async def a1111_schedulers(self, request: Request):
        async def work():
            return JSONResponse(
                [
                    {
                        "name": s.name,
                        "label": s.label,
                        "aliases": list(s.aliases) or None,
                        "default_rho": -1,
                        "need_inner_model": False,
                        # imagefab's extension: the sampler it applies to -> the imagefab scheduler used
                        "imagefab_schedulers": {a: s.variants[k] for a, k in A1111_SAMPLERS.items() if k in s.variants},
                    }
                    for s in A1111_SCHEDULES
                ]
            )

        return await self._serve(request, work)

    @api.get("/sdapi/v1/sd-models", tags=["a1111"])
    async def a1111_models(self, request: Request):
        async def work():
            return JSONResponse(
                [
                    {
                        "title": f"{b.name} [{b.sha256[:10]}]",
                        "model_name": b.name,
                        "hash": b.sha256[:10],
                        "sha256": b.sha256,
                        "filename": b.path,
                        "config": None,
                    }
                    for b in self.models.bases.values()
                ]
            )

        return await self._serve(request, work)

    @api.get("/sdapi/v1/loras", tags=["a1111"])
    async def a1111_loras(self, request: Request):
        async def work():
            return JSONResponse(
                [
                    {
                        "name": lo.name,
                        "alias": lo.name,
                        "path": lo.path,
                        "metadata": {"sha256": lo.sha256, "version": lo.version, "arch": lo.arch},
                    }
                    for lo in self.models.loras.values()
                ]
            )

        return await self._serve(request, work)

    @api.get("/sdapi/v1/samplers", tags=["a1111"])
    async def a1111_samplers(self, request: Request):
        async def work():
            names = {}
            for key, (_, extra, a1111) in SCHEDULERS.items():
                names.setdefault(a1111, {"name": a1111, "aliases": [], "options": extra})["aliases"].append(key)
            return JSONResponse(list(names.values()))

        return await self._serve(request, work)

    @api.post("/sdapi/v1/png-info", tags=["a1111"])
    async def a1111_png_info(self, body: A1111PngInfo, request: Request):
        async def work():
            data = body.image.split(",", 1)[1] if body.image.startswith("data:") else body.image
            try:
                raw = base64.b64decode(data, validate=True)
                meta = read_metadata(raw)
            except (ValueError, TypeError) as e:
                raise RequestError(422, "image", f"not a readable base64 PNG/JPEG/WebP ({e})") from None
            text = meta.get("parameters", "")
            items = {k: v for k, v in meta.items() if k != "parameters"}
            return JSONResponse({"info": text, "items": items, "parameters": parse_infotext(text) if text else {}})

        return await self._serve(request, work)

    @api.get("/sdapi/v1/progress", tags=["a1111"])
    async def a1111_progress(self, request: Request):
        """The caller's txt2img and img2img requests in flight on this replica: images back from the generators
        over images asked for (see core.a1111_progress_report)."""

        async def work():
            tasks = self.a1111_running.get(self._caller(request), [])
            return JSONResponse(a1111_progress_report(tasks, time.time()))

        return await self._serve(request, work)

    # --- operations -----------------------------------------------------------------------------------
    @api.get("/healthz", tags=["ops"])
    async def healthz(self):
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 1),
            "combinations": list(self.core.combos),
            "bases": list(self.models.bases),
        }

    @api.get("/metrics", tags=["ops"])
    async def metrics(self, request: Request):
        """Prometheus text, the totals of every ingress replica (see MetricsHub)."""

        async def work():
            if self.hub is None:
                raise RequestError(404, "metrics", "this server keeps no metrics")
            return PlainTextResponse(await self.hub.render.remote(), media_type="text/plain; version=0.0.4")

        return await self._serve(request, work)

    @api.get("/v1/stats", tags=["ops"])
    async def stats(self, request: Request):
        async def work():
            stats = {base: await h.stats.remote() for base, h in self.generators.items()}
            return JSONResponse({"generators": stats, "run_id": self.core.run_id})

        return await self._serve(request, work)


def serve_http_host() -> str | None:
    """The address Serve's HTTP proxies listen on when Serve is already running, else None."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve.context import _connect  # no public API returns the running http_options

    client = _connect(raise_if_no_controller_running=False)
    return client.http_config.host if client is not None else None


def build_app(config: ServeConfig):
    """The bound application: models resolved and checked here, before any replica starts."""
    import ray

    config.check_bind()
    # Serve's proxies, not this config, decide the address (`serve run` / KubeRay http_options).
    config.check_bind(serve_http_host())
    models = resolve_serve_models(config)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    use_gpu = config.compute.device == "cuda" or (gpus > 0 and config.compute.device == "auto")
    # CLIP on the generator replicas' GPUs, right after rendering, or in the ingress's QC: decided once here.
    clip_on_generator = config.qc.clip_runs_on_generator(generator_on_cuda=use_gpu)
    r = config.replicas
    # The bulk lane of asynchronous jobs, sized once here for every replica (app/serve/jobrunner.py).
    declared = ray.cluster_resources().get(config.jobs.bulk_resource, 0) if ray.is_initialized() else 0
    jobs = sized_lane(config.jobs, gpus, declared, len(models.bases) * r.max_replicas if use_gpu else 0)
    config = config.model_copy(update={"jobs": jobs})
    # Every replica's drain on shutdown is bounded by the grace (app/serve/shutdown.py).
    drain = drain_options(config.shutdown_grace_s)
    generators = {}
    for name, base in models.bases.items():
        usable = {n: lo for n, lo in models.loras.items() if lo.arch == base.arch}
        # @serve.deployment makes the class a Deployment; its typing still says the class
        generators[name] = GeneratorServer.options(  # type: ignore[attr-defined]
            name=f"generator-{name}",
            ray_actor_options={
                "num_gpus": 1 if use_gpu else 0,
                "num_cpus": 1 if use_gpu else 0.5,
                **(
                    {"resources": {config.compute.accelerator_resource: 1}}
                    if config.compute.accelerator_resource
                    else {}
                ),
            },
            autoscaling_config={
                "min_replicas": r.min_replicas,
                "max_replicas": r.max_replicas,
                "target_ongoing_requests": r.target_ongoing_requests,
            },
            max_ongoing_requests=max(8, config.batching.max_batch_size * 2),
            **drain,
        ).bind(
            base,
            usable,
            config.compute,
            config.batching.max_batch_size,
            config.batching.batch_wait_timeout_s,
            config.qc if clip_on_generator else None,
        )
    # Made here, once, before any replica starts: replicas then all read the same secret.
    url_secret(OutputStore.at(config.output_uri), config.url_secret)
    # Deployments (see above): Ray Serve's typing leaves the decorated classes as plain classes
    hub = MetricsHub.options(name="metrics", **drain).bind()  # type: ignore[attr-defined]
    # One runner starts and follows the queued jobs; the store is its only state (app/serve/jobrunner.py).
    output = OutputStore.at(config.output_uri).uri  # absolute: replicas need not share the driver's folder
    runner = None
    if config.jobs.runner:
        runner = JobRunnerServer.options(name="job-runner", **drain).bind(output, config.jobs)  # type: ignore[attr-defined]
    # Its allocator capped at two arenas from the process's start (app/serve/heap.py): its C heap
    # then stays flat over hours of requests. Ray merges these env_vars into the job's own.
    ingress_env = {"runtime_env": {"env_vars": allocator_env()}}
    return Ingress.options(ray_actor_options={"num_cpus": 0.25, **ingress_env}, **drain).bind(  # type: ignore[attr-defined]
        config, models, generators, hub, clip_on_generator, runner
    )


def app_builder(args: dict):
    """For `serve run` / `serve deploy`: args {config: path, …overrides}."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app(load_serve_config(path, **args))
