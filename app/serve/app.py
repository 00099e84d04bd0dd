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
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve

from app.generate import Generator
from app.models.catalog import ResolvedModel
from app.postprocess import parse_infotext, read_metadata
from app.qc import QcSettings
from app.request import RenderRequest
from app.schedulers import SCHEDULERS
from app.serve.config import ServeConfig, load_serve_config
from app.serve.core import (
    A1111_SAMPLERS,
    ImageJob,
    RequestError,
    ServeCore,
    rendered_rows,
    resolve_serve_models,
    split_lora_tags,
)
from app.serve.schemas import A1111PngInfo, A1111Txt2Img, GenerateRequest, GenerateResponse, OpenAIImageRequest
from app.spec import ComputeSpec, Size

api = FastAPI(
    title="imagefab",
    description="SDXL image generation with QC and a catalog: native, OpenAI Images and AUTOMATIC1111 APIs.",
    version="0.1.0",
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
        self.render_batch.set_max_batch_size(max_batch_size)
        self.render_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.calls = 0
        self.images = 0
        self.combinations_seen: dict[str, int] = {}

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, combination_key: str) -> str:
        # LoRA adapters are loaded by the generator's own cache on first use; multiplexing only
        # tells the router which replica has which stack warm.
        return combination_key

    async def render(self, request_json: str) -> dict:
        await self.get_model(serve.get_multiplexed_model_id())
        return await self.render_batch(request_json)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def render_batch(self, requests: list[str]) -> list[dict]:
        reqs = [RenderRequest.from_json(r) for r in requests]
        # The pipeline call (and CLIP's, when it runs here) blocks: run it off the event loop so health
        # checks keep answering.
        out = await asyncio.to_thread(
            lambda: rendered_rows(reqs, self.generator.render(reqs), self.generator.accelerator, self.clip)
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
            **self.generator.stats(),
        }

    def check_health(self) -> None:
        if self.generator.pipe is None:
            raise RuntimeError("pipeline not loaded")


class _Metrics:
    """Prometheus metrics of one ingress replica."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagefab_http_requests_total", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "imagefab_http_request_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "imagefab_requests_in_flight", "Requests being served (queue depth)", registry=self.registry
        )
        self.images = Counter("imagefab_images_total", "Images rendered", ["combination"], registry=self.registry)
        self.qc = Counter("imagefab_qc_outcomes_total", "QC outcomes", ["status"], registry=self.registry)
        self.rejected = Counter(
            "imagefab_backpressure_rejections_total", "Requests refused with 503", registry=self.registry
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": field,
            "code": status,
        }
    }
    return JSONResponse(status_code=status, content=body, headers=headers)


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, config: ServeConfig, models, generators: dict, clip_on_generator: bool = False):
        self.config = config
        self.models = models
        self.core = ServeCore(config, models, clip_on_generator=clip_on_generator)
        self.generators = generators  # base model name -> DeploymentHandle
        # ServeConfig.keys() is a method (configured + $IMAGEFAB_API_KEYS), not a dict's keys: called
        # apart, so that no linter "simplifies" it into iterating the config.
        api_keys = config.keys()
        self.keys = tuple(k.encode() for k in api_keys)
        self.metrics = _Metrics()
        self.in_flight = 0
        self.started = time.time()

    # --- guards ---------------------------------------------------------------------------------
    def _authorized(self, request: Request) -> bool:
        if not self.keys:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        # Compare against every key without stopping early: time says nothing about which matched.
        return sum(hmac.compare_digest(given, k) for k in self.keys) > 0

    async def _serve(self, route: str, request: Request, work) -> Response:
        """Auth, size and backpressure checks, then `work()`, with metrics and errors mapped."""
        t0 = time.perf_counter()
        status = 500
        try:
            if not self._authorized(request):
                status = 401
                return _error(
                    401,
                    "missing or wrong API key (Authorization: Bearer <key>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            # A chunked upload declares no length: count the bytes FastAPI has already read.
            length = int(request.headers.get("content-length") or 0) or len(await request.body())
            if length > self.config.limits.max_body_bytes:
                status = 413
                return _error(413, f"body of {length} bytes; at most {self.config.limits.max_body_bytes}")
            if self.in_flight >= self.config.limits.max_in_flight:
                status = 503
                self.metrics.rejected.inc()
                return _error(503, f"server busy: {self.in_flight} requests in flight", headers={"Retry-After": "2"})
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            try:
                response = await asyncio.wait_for(work(), timeout=self.config.limits.request_timeout_s)
                status = response.status_code
                return response
            except TimeoutError:
                status = 504
                return _error(504, f"no result within {self.config.limits.request_timeout_s} s")
            except RequestError as e:
                status = e.status
                return _error(e.status, str(e), e.field)
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    async def _render(self, job: ImageJob):
        requests = self.core.plan(job)
        base = requests[0].base_model["name"]
        handle = self.generators[base].options(multiplexed_model_id=requests[0].combination_key)
        results = await asyncio.gather(*(handle.render.remote(q.to_json()) for q in requests))
        images = await asyncio.to_thread(self.core.finish, requests, results)
        for im in images:
            self.metrics.images.labels(im.request.combination).inc()
            self.metrics.qc.labels(im.status).inc()
        return requests, images

    def _url(self, request: Request, image_id: str) -> str:
        root = self.config.public_url or str(request.base_url).rstrip("/")
        return f"{root.rstrip('/')}/v1/files/images/{image_id}.png"

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
            )
            requests, images = await self._render(job)
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
                }
                if body.response_format == "url":
                    item["url"] = self._url(request, im.image_id) if im.png else None
                else:
                    item["b64_json"] = base64.b64encode(im.png).decode() if im.png else None
                out.append(item)
            return JSONResponse(
                {"images": out, "combination": requests[0].combination, "seconds": round(time.perf_counter() - t0, 4)}
            )

        return await self._serve("/v1/generate", request, work)

    @api.get("/v1/models", tags=["native", "openai"])
    async def models_list(self, request: Request):
        async def work():
            data = [
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "imagefab",
                    "base": c.base,
                    "loras": [lo.model_dump() for lo in c.loras],
                    "steps": c.steps,
                    "guidance": c.guidance,
                    "scheduler": c.scheduler,
                }
                for name, c in self.core.combos.items()
            ]
            return JSONResponse({"object": "list", "data": data})

        return await self._serve("/v1/models", request, work)

    @api.get("/v1/files/images/{name}", tags=["native", "openai"])
    async def image_file(self, name: str, request: Request):
        async def work():
            data = await asyncio.to_thread(self.core.read_image, name.removesuffix(".png"))
            return Response(content=data, media_type="image/png")

        return await self._serve("/v1/files/images", request, work)

    # --- OpenAI Images API --------------------------------------------------------------------------
    @api.post("/v1/images/generations", tags=["openai"])
    async def openai_generations(self, body: OpenAIImageRequest, request: Request):
        async def work():
            width = height = None
            if body.size and body.size != "auto":
                try:
                    size = Size.parse(body.size)
                except ValueError as e:
                    raise RequestError(422, "size", str(e)) from None
                width, height = size.width, size.height
            job = ImageJob(
                prompt=body.prompt,
                combination=body.model,
                n=body.n,
                width=width,
                height=height,
                tags={"user": body.user} if body.user else {},
            )
            _, images = await self._render(job)
            fmt = body.response_format or "b64_json"
            data = []
            for im in images:
                if fmt == "url":
                    data.append({"url": self._url(request, im.image_id), "revised_prompt": im.request.prompt})
                else:
                    data.append({"b64_json": base64.b64encode(im.png).decode(), "revised_prompt": im.request.prompt})
            return JSONResponse({"created": int(time.time()), "data": data})

        return await self._serve("/v1/images/generations", request, work)

    # --- AUTOMATIC1111 ------------------------------------------------------------------------------
    @api.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def a1111_txt2img(self, body: A1111Txt2Img, request: Request):
        async def work():
            prompt, tag_loras = split_lora_tags(body.prompt)
            sampler = body.sampler_name or body.sampler_index
            scheduler = None
            if sampler:
                scheduler = A1111_SAMPLERS.get(sampler) or (sampler if sampler in SCHEDULERS else None)
                if scheduler is None:
                    raise RequestError(
                        422, "sampler_name", f"unknown sampler '{sampler}' (GET /sdapi/v1/samplers lists them)"
                    )
            checkpoint = body.override_settings.get("sd_model_checkpoint")
            combination, base = None, None
            if checkpoint:
                name = str(checkpoint).split(" [", 1)[0]  # A1111 titles: "name [hash]"
                if name in self.core.combos:
                    combination = name
                else:
                    base = name
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
                width=body.width,
                height=body.height,
            )
            _, images = await self._render(job)
            infotexts = [read_metadata(im.png).get("parameters", "") if im.png else "" for im in images]
            info = {
                "prompt": body.prompt,
                "all_prompts": [body.prompt] * len(images),
                "negative_prompt": body.negative_prompt,
                "seed": images[0].seed,
                "all_seeds": [im.seed for im in images],
                "subseed": -1,
                "all_subseeds": [-1] * len(images),
                "steps": images[0].request.steps,
                "cfg_scale": images[0].request.guidance,
                "sampler_name": SCHEDULERS[images[0].request.scheduler][2],
                "width": images[0].width,
                "height": images[0].height,
                "sd_model_name": images[0].request.base_model["name"],
                "sd_model_hash": images[0].request.base_model["sha256"][:10],
                "batch_size": body.batch_size,
                "infotexts": infotexts,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                "extra_generation_params": {
                    "imagefab image_ids": [im.image_id for im in images],
                    "imagefab qc": [im.status for im in images],
                },
            }
            return JSONResponse(
                {
                    "images": [base64.b64encode(im.png).decode() for im in images],
                    "parameters": body.model_dump(),
                    "info": json.dumps(info),
                }
            )

        return await self._serve("/sdapi/v1/txt2img", request, work)

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

        return await self._serve("/sdapi/v1/sd-models", request, work)

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

        return await self._serve("/sdapi/v1/loras", request, work)

    @api.get("/sdapi/v1/samplers", tags=["a1111"])
    async def a1111_samplers(self, request: Request):
        async def work():
            names = {}
            for key, (_, extra, a1111) in SCHEDULERS.items():
                names.setdefault(a1111, {"name": a1111, "aliases": [], "options": extra})["aliases"].append(key)
            return JSONResponse(list(names.values()))

        return await self._serve("/sdapi/v1/samplers", request, work)

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

        return await self._serve("/sdapi/v1/png-info", request, work)

    @api.get("/sdapi/v1/progress", tags=["a1111"])
    async def a1111_progress(self, request: Request):
        async def work():
            busy = self.in_flight > 1  # this request itself is in flight
            return JSONResponse(
                {
                    "progress": 0.0,
                    "eta_relative": 0.0,
                    "current_image": None,
                    "textinfo": None,
                    "state": {
                        "job_count": self.in_flight - 1,
                        "job": "txt2img" if busy else "",
                        "interrupted": False,
                        "skipped": False,
                    },
                }
            )

        return await self._serve("/sdapi/v1/progress", request, work)

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
        async def work():
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        return await self._serve("/metrics", request, work)

    @api.get("/v1/stats", tags=["ops"])
    async def stats(self, request: Request):
        async def work():
            stats = {base: await h.stats.remote() for base, h in self.generators.items()}
            return JSONResponse({"generators": stats, "run_id": self.core.run_id})

        return await self._serve("/v1/stats", request, work)


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
    generators = {}
    for name, base in models.bases.items():
        usable = {n: lo for n, lo in models.loras.items() if lo.arch == base.arch}
        generators[name] = GeneratorServer.options(
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
        ).bind(
            base,
            usable,
            config.compute,
            config.batching.max_batch_size,
            config.batching.batch_wait_timeout_s,
            config.qc if clip_on_generator else None,
        )
    return Ingress.options(ray_actor_options={"num_cpus": 0.25}).bind(config, models, generators, clip_on_generator)


def app_builder(args: dict):
    """For `serve run` / `serve deploy`: args {config: path, …overrides}."""
    args = dict(args or {})
    path = args.pop("config", None)
    return build_app(load_serve_config(path, **args))
