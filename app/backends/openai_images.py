"""OpenAI-compatible image servers: POST /v1/images/generations with `response_format: b64_json`.

Field mapping: prompt, size ("WxH"), model. The API has no seed, steps, guidance, negative prompt
or sampler: those are recorded as unhonoured and the image as not reproducible. A content-policy
refusal (400 with `error.code: content_policy_violation`) becomes a failed row with its message.

Image-conditioned requests go to POST /v1/images/edits (multipart: `image`, `mask` with OpenAI's
convention, transparent = edit, `prompt`, `n`, `size`, `response_format`, `model`): inpaint and
outpaint (the canvas and its mask), img2img (the image without a mask); the strength and mask blur
cannot be sent (unhonoured). An upscale has no OpenAI endpoint: the row fails saying so.
"""

from __future__ import annotations

import httpx

from app.backends.base import BackendConfig, BackendError, BackendResult, Lineage, RemoteBackend, endpoint_host
from app.backends.conditioned import mask_png, png
from app.backends.credentials import Secret, load_secret, redact
from app.backends.images import decode_b64_image
from app.backends.retry import http_error, status_error, with_retries
from app.conditioning.plan import Prepared
from app.request import RenderRequest

DEFAULT_ENDPOINT = "https://api.openai.com"
REFUSAL_CODES = {"content_policy_violation", "moderation_blocked"}


def generations_payload(request: RenderRequest, model: str | None) -> dict:
    payload: dict = {
        "prompt": request.prompt,
        "n": 1,
        "size": f"{request.width}x{request.height}",
        "response_format": "b64_json",
    }
    if model:
        payload["model"] = model
    return payload


def unhonoured_fields(request: RenderRequest) -> tuple[str, ...]:
    fields = ["seed", "steps", "guidance", "scheduler"]
    if request.negative_prompt:
        fields.append("negative_prompt")
    if request.loras:
        fields.append("loras")
    return tuple(fields)


class OpenAIImagesBackend(RemoteBackend):
    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.name = "openai"
        self.endpoint = config.endpoints[0] if config.endpoints else DEFAULT_ENDPOINT
        self.secret: Secret | None = load_secret(config.credentials)
        headers = {"Authorization": f"Bearer {self.secret.reveal()}"} if self.secret else {}
        self.client = httpx.Client(base_url=self.endpoint, timeout=config.timeout_s, headers=headers)
        self.where = f"openai {endpoint_host(self.endpoint)}"

    def _post(self, payload: dict, files: dict | None = None) -> httpx.Response:
        try:
            if files:  # the edits endpoint: multipart, the fields as form parts
                data = {k: str(v) for k, v in payload.items()}
                response = self.client.post("/v1/images/edits", data=data, files=files)
            else:
                response = self.client.post("/v1/images/generations", json=payload)
        except httpx.HTTPError as e:
            raise http_error(e, self.where) from None
        if response.status_code != 200:
            code, message = _error(response)
            message = redact(message, self.secret)
            if response.status_code == 400 and code in REFUSAL_CODES:
                raise BackendError("refused", message, status=400)
            raise status_error(response, message, self.where)
        return response

    def render_one(self, request: RenderRequest) -> BackendResult:
        return self._call(request, generations_payload(request, self.config.model), None, unhonoured_fields(request))

    def render_conditioned(self, request: RenderRequest, prepared: Prepared) -> BackendResult:
        cond = request.conditioning
        assert cond is not None
        if cond.mode == "upscale":
            raise BackendError("invalid", f"{self.where}: the OpenAI images API has no upscale endpoint")
        width, height = prepared.render_size
        payload = {**generations_payload(request, self.config.model), "size": f"{width}x{height}"}
        files = {"image": ("image.png", png(prepared.image), "image/png")}
        if prepared.generate is not None:
            files["mask"] = ("mask.png", mask_png(prepared, transparent_edits=True), "image/png")
        unhonoured = (*unhonoured_fields(request), "strength", *(("mask_blur",) if cond.mask_blur else ()))
        return self._call(request, payload, files, unhonoured)

    def _call(
        self, request: RenderRequest, payload: dict, files: dict | None, unhonoured: tuple[str, ...]
    ) -> BackendResult:
        attempts = 0

        def attempt() -> httpx.Response:
            nonlocal attempts
            attempts += 1
            return self._post(payload, files)

        response = with_retries(self.config, attempt)
        try:
            body = response.json()
        except ValueError:
            raise BackendError("bad_response", f"{self.where}: the answer is not JSON") from None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise BackendError("bad_response", f"{self.where}: the answer has no data[0]")
        pixels = decode_b64_image(data[0].get("b64_json"), self.where)
        lineage = Lineage(
            backend=self.name,
            endpoint_host=endpoint_host(self.endpoint),
            provider_model=self.config.model,
            request_id=response.headers.get("x-request-id"),
            seed=None,  # the API neither takes nor returns one
            reproducible=False,
            unhonoured=unhonoured,
        )
        return BackendResult(request.image_id, pixels, lineage, cost_usd=self.price(), attempts=attempts)

    def preflight(self) -> None:
        """GET /v1/models: 401 here stops the run before any image is paid for."""
        try:
            response = self.client.get("/v1/models")
        except httpx.HTTPError as e:
            raise http_error(e, self.where) from None
        if response.status_code in (401, 403):
            raise status_error(response, redact(_error(response)[1], self.secret), self.where)

    def close(self) -> None:
        self.client.close()


def _error(response: httpx.Response) -> tuple[object, str]:
    """OpenAI's error shape: {"error": {"message", "type", "code"}}; anything else as text."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:300] or response.reason_phrase
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return err.get("code"), str(err.get("message") or err)[:300]
    if isinstance(body, dict) and body.get("detail"):
        return None, str(body["detail"])[:300]
    return None, str(body)[:300]
