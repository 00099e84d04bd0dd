"""AUTOMATIC1111 `--api` servers, one or a farm: POST /sdapi/v1/txt2img.

Requests go round-robin over the healthy endpoints; one that refuses connections or answers 5xx is
taken out for `cooldown_s` and tried again after. Field mapping: prompt, negative_prompt, seed,
steps, cfg_scale (guidance), width, height, sampler_name (the scheduler's A1111 name) and, when the
spec names one, the checkpoint (`override_settings.sd_model_checkpoint`). LoRAs are not sent (an
A1111 server loads them from `<lora:name:weight>` tags on its own files); they are recorded as
unhonoured. Not reproducible: farm members may differ in card, attention kernels and versions.

Image-conditioned requests go to POST /sdapi/v1/img2img with the prepared init image (the canvas
of an outpaint, the Lanczos-upscaled image of an upscale) in `init_images`, `denoising_strength`,
`resize_mode` 0 at the render size, and for inpaint and outpaint the `mask` (white = generate),
`mask_blur`, `inpainting_fill` 1 ("original") and `inpaint_full_res` false. An upscale is one
img2img pass at the full size (A1111 has no tiled img2img over the API): `tile` is unhonoured.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from app.backends.base import BackendConfig, BackendError, BackendResult, Lineage, RemoteBackend, endpoint_host
from app.backends.conditioned import mask_png, png
from app.backends.credentials import Secret, load_secret, redact
from app.backends.images import decode_b64_image
from app.backends.retry import http_error, status_error, with_retries
from app.conditioning.plan import Prepared
from app.request import RenderRequest
from app.schedulers import SCHEDULERS


@dataclass
class EndpointPool:
    """Round-robin over endpoints; a failing one sits out `cooldown_s`."""

    endpoints: tuple[str, ...]
    cooldown_s: float
    _next: int = 0
    _down_until: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pick(self) -> str:
        with self._lock:
            now = time.monotonic()
            n = len(self.endpoints)
            for i in range(n):
                e = self.endpoints[(self._next + i) % n]
                if self._down_until.get(e, 0.0) <= now:
                    self._next = (self._next + i + 1) % n
                    return e
            # All are cooling down: try the one that comes back first rather than none.
            e = min(self.endpoints, key=lambda x: self._down_until.get(x, 0.0))
            return e

    def mark_down(self, endpoint: str) -> None:
        with self._lock:
            self._down_until[endpoint] = time.monotonic() + self.cooldown_s

    def mark_up(self, endpoint: str) -> None:
        with self._lock:
            self._down_until.pop(endpoint, None)

    def healthy(self) -> list[str]:
        now = time.monotonic()
        return [e for e in self.endpoints if self._down_until.get(e, 0.0) <= now]


def img2img_payload(request: RenderRequest, prepared: Prepared, model: str | None) -> dict:
    cond = request.conditioning
    assert cond is not None
    width, height = prepared.render_size
    payload = {
        **txt2img_payload(request, model),
        "init_images": [base64.b64encode(png(prepared.image)).decode()],
        "denoising_strength": float(cond.strength),
        "resize_mode": 0,
        "width": width,
        "height": height,
    }
    if prepared.generate is not None:
        payload.update(
            mask=base64.b64encode(mask_png(prepared)).decode(),
            mask_blur=int(cond.mask_blur),
            inpainting_fill=1,
            inpaint_full_res=False,
            inpainting_mask_invert=0,
        )
    return payload


def txt2img_payload(request: RenderRequest, model: str | None) -> dict:
    payload = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": int(request.seed),
        "steps": int(request.steps),
        "cfg_scale": float(request.guidance),
        "width": int(request.width),
        "height": int(request.height),
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
    }
    if request.scheduler in SCHEDULERS:
        payload["sampler_name"] = SCHEDULERS[request.scheduler][2]
    if model:
        payload["override_settings"] = {"sd_model_checkpoint": model}
    return payload


class A1111Backend(RemoteBackend):
    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.name = "a1111"
        self.secret: Secret | None = load_secret(config.credentials)
        headers = {"Authorization": f"Bearer {self.secret.reveal()}"} if self.secret else {}
        self.client = httpx.Client(timeout=config.timeout_s, headers=headers)
        self.pool = EndpointPool(config.endpoints, config.cooldown_s)

    def _post(self, endpoint: str, payload: dict, route: str = "txt2img") -> httpx.Response:
        url = f"{endpoint}/sdapi/v1/{route}"
        where = f"a1111 {endpoint_host(endpoint)}"
        try:
            response = self.client.post(url, json=payload)
        except httpx.HTTPError as e:
            self.pool.mark_down(endpoint)
            raise http_error(e, where) from None
        if response.status_code >= 500:
            self.pool.mark_down(endpoint)
        if response.status_code != 200:
            raise status_error(response, redact(_reason(response), self.secret), where)
        self.pool.mark_up(endpoint)
        return response

    def render_one(self, request: RenderRequest) -> BackendResult:
        return self._call(request, txt2img_payload(request, self.config.model), "txt2img")

    def render_conditioned(self, request: RenderRequest, prepared: Prepared) -> BackendResult:
        mode = request.conditioning.mode if request.conditioning else ""
        return self._call(request, img2img_payload(request, prepared, self.config.model), "img2img", mode)

    def _call(self, request: RenderRequest, payload: dict, route: str, mode: str = "") -> BackendResult:
        used: list[str] = []
        attempts = 0

        def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            endpoint = self.pool.pick()
            used.append(endpoint)
            return self._post(endpoint, payload, route)

        response = with_retries(self.config, attempt)
        endpoint = used[-1]
        where = f"a1111 {endpoint_host(endpoint)}"
        try:
            body = response.json()
        except ValueError:
            raise BackendError("bad_response", f"{where}: the answer is not JSON") from None
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or not images:
            raise BackendError("bad_response", f"{where}: the answer has no images")
        pixels = decode_b64_image(images[0], where)
        info = _info(body.get("info"))
        seed = info.get("seed")
        lineage = Lineage(
            backend=self.name,
            endpoint_host=endpoint_host(endpoint),
            provider_model=info.get("sd_model_name") or self.config.model,
            request_id=response.headers.get("x-request-id"),
            seed=int(seed) if isinstance(seed, int) else None,
            reproducible=False,
            unhonoured=(*(("loras",) if request.loras else ()), *(("tile",) if mode == "upscale" else ())),
        )
        return BackendResult(request.image_id, pixels, lineage, cost_usd=self.price(), attempts=attempts)

    def preflight(self) -> None:
        """GET /sdapi/v1/sd-models on each endpoint: a wrong key stops the run here; a dead one sits out."""
        reachable = 0
        for endpoint in self.config.endpoints:
            where = f"a1111 {endpoint_host(endpoint)}"
            try:
                response = self.client.get(f"{endpoint}/sdapi/v1/sd-models")
            except httpx.HTTPError:
                self.pool.mark_down(endpoint)
                continue
            if response.status_code in (401, 403):
                raise status_error(response, redact(_reason(response), self.secret), where)
            reachable += 1
        if not reachable:
            raise BackendError(
                "transient",
                f"a1111: none of {len(self.config.endpoints)} endpoints answered (first: "
                f"{endpoint_host(self.config.endpoints[0])})",
            )

    def close(self) -> None:
        self.client.close()


def _info(raw: object) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            d = json.loads(raw)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}
    return {}


def _reason(response: httpx.Response) -> str:
    """The server's own message: A1111 answers {"detail": ...} / {"error": ..., "errors": ...}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "errors", "error", "message"):
            if body.get(key):
                return str(body[key])[:300]
    return str(body)[:300]
