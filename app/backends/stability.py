"""Stability AI's REST v2beta stable-image generate endpoints: core, ultra, sd3; and its edit and
upscale endpoints for image-conditioned requests.

POST {endpoint}/v2beta/stable-image/generate/{core|ultra|sd3} as multipart/form-data, with
`Authorization: Bearer <key>` and `Accept: image/*` (the image bytes; `finish-reason`, `seed` and
`x-request-id` in headers) or `Accept: application/json` (`{"image": base64, "finish_reason",
"seed"}`). `finish_reason: CONTENT_FILTERED` is the provider's refusal: the row fails with it.

Field mapping: prompt, negative_prompt, seed (0 asks Stability to pick one, so seed 0 is sent as
4294967294), aspect_ratio (the nearest of Stability's ratios to width:height; the provider picks the
pixel size), cfg_scale (sd3 only), model (sd3's sd3.5-large/-medium/-large-turbo). Steps, sampler
and LoRAs cannot be set: recorded as unhonoured. Not reproducible: the hosted model can change
under the same engine name.

Image-conditioned requests (app/backends/conditioned.py prepares and finishes them):
- inpaint, and outpaint with a mask inside the original (a packshot's transparent background):
  `edit/inpaint` with the prepared image (the canvas, for an outpaint) and the mask (white =
  generate); `grow_mask` is the request's `mask_blur`;
- outpaint that only extends the canvas: `edit/outpaint` with the original and the pixels to add
  on each side (`left`, `right`, `up`, `down`), `creativity` = the strength;
- img2img: `generate/sd3` (`mode: image-to-image`) or `generate/ultra` with `image` and `strength`;
  core takes no input image and the row fails saying so;
- upscale: `upscale/conservative` with the input, `creativity` = the strength within 0.2–0.5 (the
  provider picks the output size, resized to the request's: width/height unhonoured).
"""

from __future__ import annotations

import base64
import binascii

import httpx
import numpy as np

from app.backends.base import BackendConfig, BackendError, BackendResult, Lineage, RemoteBackend, endpoint_host
from app.backends.conditioned import mask_png, png
from app.backends.credentials import Secret, load_secret, redact
from app.backends.images import decode_image
from app.backends.prices import STABILITY_EDIT_USD
from app.backends.retry import http_error, status_error, with_retries
from app.conditioning.plan import Prepared
from app.request import RenderRequest

DEFAULT_ENDPOINT = "https://api.stability.ai"
ENGINES = ("core", "ultra", "sd3")
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium")
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21")
MAX_SEED = 4294967294


def nearest_aspect_ratio(width: int, height: int) -> str:
    want = width / height

    def ratio(text: str) -> float:
        w, h = text.split(":")
        return int(w) / int(h)

    return min(ASPECT_RATIOS, key=lambda r: abs(ratio(r) - want))


def engine_and_model(model: str | None) -> tuple[str, str | None]:
    """The spec's `model`: an engine (core|ultra|sd3) or an sd3 model id (sd3.5-large…)."""
    name = model or "core"
    if name in ENGINES:
        return name, None
    if name in SD3_MODELS:
        return "sd3", name
    raise ValueError(f"stability model must be one of {list(ENGINES + SD3_MODELS)}, not {name!r}")


def form_fields(request: RenderRequest, engine: str, sd3_model: str | None) -> dict[str, str]:
    fields = {
        "prompt": request.prompt,
        "aspect_ratio": nearest_aspect_ratio(request.width, request.height),
        "seed": str(request.seed % MAX_SEED or MAX_SEED),
        "output_format": "png",
    }
    if request.negative_prompt:
        fields["negative_prompt"] = request.negative_prompt
    if engine == "sd3":
        fields["mode"] = "text-to-image"
        fields["cfg_scale"] = f"{request.guidance:g}"
        if sd3_model:
            fields["model"] = sd3_model
    return fields


def unhonoured_fields(request: RenderRequest, engine: str) -> tuple[str, ...]:
    fields = ["steps", "scheduler", "width", "height"]  # width/height: an aspect ratio only
    if engine != "sd3":
        fields.append("guidance")
    if request.loras:
        fields.append("loras")
    return tuple(fields)


class StabilityBackend(RemoteBackend):
    def __init__(self, config: BackendConfig, accept: str = "image/*"):
        super().__init__(config)
        self.name = "stability"
        self.engine, self.sd3_model = engine_and_model(config.model)
        if accept not in ("image/*", "application/json"):
            raise ValueError(f"accept must be 'image/*' or 'application/json', not {accept!r}")
        self.accept = accept
        self.endpoint = config.endpoints[0] if config.endpoints else DEFAULT_ENDPOINT
        self.secret: Secret | None = load_secret(config.credentials)
        if self.secret is None:
            raise ValueError("backend stability needs credentials: 'env:STABILITY_API_KEY' or 'file:/path'")
        self.client = httpx.Client(
            base_url=self.endpoint,
            timeout=config.timeout_s,
            headers={"Authorization": f"Bearer {self.secret.reveal()}"},
        )
        self.where = f"stability {endpoint_host(self.endpoint)}"

    def _post(self, fields: dict[str, str], path: str = "", images: dict[str, bytes] | None = None) -> httpx.Response:
        # Every field as a multipart part without a filename: the API takes multipart/form-data only.
        files: dict[str, tuple] = {name: (None, value) for name, value in fields.items()}
        files.update({name: (f"{name}.png", data, "image/png") for name, data in (images or {}).items()})
        try:
            response = self.client.post(
                path or f"/v2beta/stable-image/generate/{self.engine}", files=files, headers={"Accept": self.accept}
            )
        except httpx.HTTPError as e:
            raise http_error(e, self.where) from None
        if response.status_code != 200:
            reason = redact(_reason(response), self.secret)
            if response.status_code == 403:  # Stability: the request was flagged by content moderation
                raise BackendError("refused", reason, status=403)
            raise status_error(response, reason, self.where)
        return response

    def render_one(self, request: RenderRequest) -> BackendResult:
        fields = form_fields(request, self.engine, self.sd3_model)
        return self._call(request, fields, "", {}, self.sd3_model or self.engine, self.price())

    def render_conditioned(self, request: RenderRequest, prepared: Prepared) -> BackendResult:
        cond = request.conditioning
        assert cond is not None
        fields = {"prompt": request.prompt, "seed": str(request.seed % MAX_SEED or MAX_SEED), "output_format": "png"}
        if request.negative_prompt:
            fields["negative_prompt"] = request.negative_prompt
        if cond.mode == "img2img":
            if self.engine == "core":
                raise BackendError("invalid", f"{self.where}: core takes no input image: use sd3 or ultra for img2img")
            fields["strength"] = f"{cond.strength:g}"
            if self.engine == "sd3":
                fields["mode"] = "image-to-image"
                fields["cfg_scale"] = f"{request.guidance:g}"
                if self.sd3_model:
                    fields["model"] = self.sd3_model
            images = {"image": png(prepared.image)}
            return self._call(request, fields, "", images, self.sd3_model or self.engine, self.price())
        if cond.mode == "upscale":
            assert prepared.source is not None
            fields["creativity"] = f"{min(0.5, max(0.2, cond.strength)):g}"
            images = {"image": png(prepared.source)}
            path = "/v2beta/stable-image/upscale/conservative"
            return self._call(request, fields, path, images, "upscale/conservative", STABILITY_EDIT_USD["upscale"])
        box = _kept_box(prepared) if cond.mask_source == "canvas" else None
        if box is not None:  # the canvas only extends the original: the outpaint endpoint
            fields.pop("negative_prompt", None)  # the outpaint endpoint takes none
            x, y, w, h = box
            width, height = prepared.render_size
            sides = {"left": x, "right": width - x - w, "up": y, "down": height - y - h}
            fields.update({k: str(v) for k, v in sides.items()}, creativity=f"{cond.strength:g}")
            images = {"image": png(prepared.image[y : y + h, x : x + w])}
            path = "/v2beta/stable-image/edit/outpaint"
            return self._call(request, fields, path, images, "edit/outpaint", STABILITY_EDIT_USD["outpaint"])
        fields["grow_mask"] = str(min(100, cond.mask_blur))
        images = {"image": png(prepared.image), "mask": mask_png(prepared)}
        path = "/v2beta/stable-image/edit/inpaint"
        return self._call(request, fields, path, images, "edit/inpaint", STABILITY_EDIT_USD["inpaint"])

    def _call(
        self, request: RenderRequest, fields: dict, path: str, images: dict, provider_model: str, price: float
    ) -> BackendResult:
        attempts = 0

        def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return self._post(fields, path, images)

        response = with_retries(self.config, attempt)
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            try:
                body = response.json()
            except ValueError:
                raise BackendError("bad_response", f"{self.where}: the answer is not JSON") from None
            if not isinstance(body, dict):
                raise BackendError("bad_response", f"{self.where}: the answer is not a JSON object")
            finish, seed = body.get("finish_reason"), body.get("seed")
            if finish == "CONTENT_FILTERED":
                raise BackendError("refused", f"{self.where}: finish_reason CONTENT_FILTERED")
            try:
                raw = base64.b64decode(str(body.get("image") or ""), validate=True)
            except (binascii.Error, ValueError):
                raise BackendError("bad_response", f"{self.where}: the image is not valid base64") from None
        elif content_type.startswith("image/"):
            finish, seed = response.headers.get("finish-reason"), response.headers.get("seed")
            if finish == "CONTENT_FILTERED":
                raise BackendError("refused", f"{self.where}: finish-reason CONTENT_FILTERED")
            raw = response.content
        else:
            raise BackendError("bad_response", f"{self.where}: unexpected content-type {content_type!r}")
        if finish not in (None, "SUCCESS"):
            raise BackendError("bad_response", f"{self.where}: finish_reason {finish!r}")
        pixels = decode_image(raw, self.where)
        lineage = Lineage(
            backend=self.name,
            endpoint_host=endpoint_host(self.endpoint),
            provider_model=provider_model,
            request_id=response.headers.get("x-request-id"),
            seed=_int(seed),
            reproducible=False,
            unhonoured=unhonoured_fields(request, self.engine),
        )
        return BackendResult(request.image_id, pixels, lineage, cost_usd=price, attempts=attempts)

    def preflight(self) -> None:
        """GET /v1/user/balance: a wrong key (401) stops the run; no credits left (0) too."""
        try:
            response = self.client.get("/v1/user/balance")
        except httpx.HTTPError as e:
            raise http_error(e, self.where) from None
        if response.status_code != 200:
            raise status_error(response, redact(_reason(response), self.secret), self.where)
        try:
            credits = float(response.json().get("credits", 0))
        except (ValueError, AttributeError, TypeError):
            raise BackendError("bad_response", f"{self.where}: /v1/user/balance is not {{'credits': n}}") from None
        if credits <= 0:
            raise BackendError("auth", f"{self.where}: the account has no credits left", status=402)

    def close(self) -> None:
        self.client.close()


def _kept_box(prepared: Prepared) -> tuple[int, int, int, int] | None:
    """(x, y, width, height) of the kept region when it is exactly a rectangle, else None."""
    if prepared.generate is None:
        return None
    keep = ~prepared.generate
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if not len(rows):
        return None
    y, x = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - y + 1, int(cols[-1]) - x + 1
    return (x, y, w, h) if keep[y : y + h, x : x + w].all() and int(keep.sum()) == w * h else None


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _reason(response: httpx.Response) -> str:
    """Stability's error shape: {"id", "name", "errors": [...]}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            return "; ".join(str(e) for e in errors)[:300]
        if body.get("message"):
            return str(body["message"])[:300]
    return str(body)[:300]
