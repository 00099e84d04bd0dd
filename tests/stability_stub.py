"""A loopback server that follows Stability AI's documented REST v2beta stable-image contract, and
nothing more, plus fault modes for the backend's tests.

Documented behaviour it keeps:
- POST /v2beta/stable-image/generate/{core,ultra,sd3}, multipart/form-data only, `Authorization:
  Bearer <key>`; `Accept: image/*` (default) answers the image bytes with `finish-reason`, `seed`
  and `x-request-id` headers; `Accept: application/json` answers {"image", "finish_reason", "seed"}.
- Fields: prompt (required, 1..10000 chars), negative_prompt, aspect_ratio (one of nine), seed
  (0..4294967294; 0 = pick one), output_format (png|jpeg|webp); sd3: mode, model, cfg_scale.
- A filtered prompt answers 200 with `finish_reason: CONTENT_FILTERED` (a blurred image).
- Errors are JSON {"id", "name", "errors": [...]}: 400 bad fields, 401 a wrong key, 402 no credits
  left, 429 too many requests.
- GET /v1/user/balance answers {"credits": n}.
- Image inputs (files in the multipart body): `generate/sd3` with `mode: image-to-image` needs
  `image` and `strength` (0..1) and takes no aspect_ratio; `generate/ultra` takes an optional
  `image` with `strength`; core takes none. POST /v2beta/stable-image/edit/inpaint: `image`,
  `prompt`, optional `mask` (else the image's alpha), `grow_mask` (0..100), answers at the image's
  size. POST /v2beta/stable-image/edit/outpaint: `image`, at least one of `left`, `right`, `up`,
  `down` (0..2000), optional `prompt`, `creativity` (0..1), answers the extended size.
  POST /v2beta/stable-image/upscale/conservative: `image`, `prompt`, `creativity` (0.2..0.5),
  answers up to 4 megapixels (here 4x per side at most).
The images are small deterministic noise from the seed; sizes keep the requested aspect ratio.
An image answer to an edit keeps the input's pixels where its mask keeps them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

ASPECT_RATIOS = {"21:9", "16:9", "3:2", "5:4", "1:1", "4:5", "2:3", "9:16", "9:21"}
ENGINES = {"core", "ultra", "sd3"}
SD3_MODELS = {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"}
CREDITS = {
    "core": 3.0,
    "ultra": 8.0,
    "sd3": 6.5,
    "edit/inpaint": 3.0,
    "edit/outpaint": 4.0,
    "upscale/conservative": 25.0,
}
EDITS = {"edit/inpaint", "edit/outpaint", "upscale/conservative"}


@dataclass
class StubState:
    key: str
    credits: float = 1000.0
    blocked_words: tuple[str, ...] = ("forbidden",)
    base_px: int = 64  # the short side of an answer (the real API answers ~1 megapixel)
    # Fault modes, each consumed per request:
    delay_s: float = 0.0  # every generate answer waits this long
    fail_500: int = 0  # the next N generate calls answer 500
    rate_limited: int = 0  # the next N generate calls answer 429 with Retry-After
    retry_after_s: int = 1
    malformed: int = 0  # the next N generate calls answer 200 with a body that is not an image
    posts: int = 0  # generate calls that arrived, refused ones included
    requests: list[dict] = field(default_factory=list)  # accepted ones: fields + accept + time
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, name: str) -> bool:
        with self.lock:
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return True
            return False


def _noise(seed: int, ratio: str, base_px: int, fmt: str, blur: bool) -> tuple[bytes, str]:
    w, h = (int(x) for x in ratio.split(":"))
    scale = base_px / min(w, h)
    width, height = max(8, round(w * scale)), max(8, round(h * scale))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # [H, W, 3]
    if blur:
        pixels[:] = pixels.mean(axis=(0, 1)).astype(np.uint8)
    buf = io.BytesIO()
    pil_fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    Image.fromarray(pixels).save(buf, format=pil_fmt)
    return buf.getvalue(), f"image/{fmt}"


def _handler(state: StubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-request-id", uuid.uuid4().hex)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, name: str, message: str, headers: dict | None = None) -> None:
            self._json(status, {"id": uuid.uuid4().hex, "name": name, "errors": [message]}, headers)

        def _authorized(self) -> bool:
            if self.headers.get("authorization") != f"Bearer {state.key}":
                self._error(401, "unauthorized", "Missing or invalid API key")
                return False
            return True

        def do_GET(self):
            if self.path != "/v1/user/balance":
                return self._error(404, "not_found", f"{self.path} not found")
            if self._authorized():
                self._json(200, {"credits": state.credits})

        def do_POST(self):
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            prefix = "/v2beta/stable-image/"
            engine = self.path[len(prefix) :].removeprefix("generate/")
            if not self.path.startswith(prefix) or engine not in ENGINES | EDITS:
                return self._error(404, "not_found", f"{self.path} not found")
            with state.lock:
                state.posts += 1
            if not self._authorized():
                return
            ctype = self.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                return self._error(400, "bad_request", "content-type: must be multipart/form-data")
            msg = BytesParser(policy=HTTP).parsebytes(f"content-type: {ctype}\r\n\r\n".encode() + raw)
            fields: dict[str, str] = {}
            files: dict[str, bytes] = {}
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if part.get_filename() is not None:
                    files[str(name)] = payload
                else:
                    fields[str(name)] = payload.decode()
            accept = self.headers.get("accept", "image/*")
            with state.lock:
                state.requests.append(
                    {"engine": engine, "fields": fields, "files": files, "accept": accept, "t": time.monotonic()}
                )
            if state.delay_s:
                time.sleep(state.delay_s)
            if state.take("rate_limited"):
                return self._error(
                    429,
                    "rate_limit_exceeded",
                    "You have exceeded the rate limit of 150 requests within a 10 second period",
                    {"retry-after": str(state.retry_after_s)},
                )
            if state.take("fail_500"):
                return self._error(500, "internal_error", "An unexpected server error has occurred")
            # 1. Check inputs, as the documentation lists them.
            prompt = fields.get("prompt", "")
            if engine in EDITS or "image" in files:
                return self._image_input(engine, fields, files, accept)
            if engine == "sd3" and fields.get("mode") == "image-to-image":
                return self._error(400, "bad_request", "image: is required for mode image-to-image")
            if not 1 <= len(prompt) <= 10000:
                return self._error(400, "bad_request", "prompt: is required and must be 1 to 10000 characters")
            ratio = fields.get("aspect_ratio", "1:1")
            if ratio not in ASPECT_RATIOS:
                return self._error(400, "bad_request", f"aspect_ratio: must be one of {sorted(ASPECT_RATIOS)}")
            try:
                seed = int(fields.get("seed", "0"))
            except ValueError:
                seed = -1
            if not 0 <= seed <= 4294967294:
                return self._error(400, "bad_request", "seed: must be an integer from 0 to 4294967294")
            fmt = fields.get("output_format", "png")
            if fmt not in ("png", "jpeg", "webp"):
                return self._error(400, "bad_request", "output_format: must be png, jpeg or webp")
            if engine == "sd3" and fields.get("model", "sd3.5-large") not in SD3_MODELS:
                return self._error(400, "bad_request", f"model: must be one of {sorted(SD3_MODELS)}")
            if accept not in ("image/*", "application/json"):
                return self._error(400, "bad_request", "accept: must be image/* or application/json")
            cost = CREDITS[engine]
            with state.lock:
                if state.credits < cost:
                    return self._error(402, "payment_required", "You lack sufficient credits to make this request")
                state.credits -= cost
            # 2. Render.
            if seed == 0:
                seed = int(np.random.default_rng().integers(1, 4294967294))
            filtered = any(w in prompt.lower() for w in state.blocked_words)
            finish = "CONTENT_FILTERED" if filtered else "SUCCESS"
            data, mime = _noise(seed, ratio, state.base_px, fmt, blur=filtered)
            if state.take("malformed"):
                data = b"\x89PNG\r\n\x1a\n" + b"not really an image"
            # 3. Answer.
            if accept == "application/json":
                import base64

                return self._json(
                    200, {"image": base64.b64encode(data).decode(), "finish_reason": finish, "seed": seed}
                )
            self.send_response(200)
            self.send_header("content-type", mime)
            self.send_header("content-length", str(len(data)))
            self.send_header("finish-reason", finish)
            self.send_header("seed", str(seed))
            self.send_header("x-request-id", uuid.uuid4().hex)
            self.end_headers()
            self.wfile.write(data)

        def _image_input(self, engine: str, fields: dict, files: dict, accept: str) -> None:
            """The edit and upscale endpoints, and generate with an input image."""
            if "image" not in files:
                return self._error(400, "bad_request", "image: is required")
            try:
                with Image.open(io.BytesIO(files["image"])) as im:
                    source = np.asarray(im.convert("RGBA"))  # [h, w, 4]
            except Exception:
                return self._error(400, "bad_request", "image: is not a readable image")
            h, w = source.shape[:2]
            prompt = fields.get("prompt", "")
            if engine != "edit/outpaint" and not 1 <= len(prompt) <= 10000:
                return self._error(400, "bad_request", "prompt: is required and must be 1 to 10000 characters")
            if "aspect_ratio" in fields:
                return self._error(400, "bad_request", "aspect_ratio: not allowed with an input image")
            seed = int(fields.get("seed", "0") or 0) or 42
            rng = np.random.default_rng(seed)
            if engine in ("core",):
                return self._error(400, "bad_request", "image: core takes no input image")
            if engine in ("sd3", "ultra"):
                try:
                    strength = float(fields["strength"])
                except (KeyError, ValueError):
                    return self._error(400, "bad_request", "strength: is required with an image, 0..1")
                if engine == "sd3" and fields.get("mode") != "image-to-image":
                    return self._error(400, "bad_request", "mode: must be image-to-image with an image")
                noise = rng.integers(0, 256, size=(h, w, 3))
                out = np.rint((1 - strength) * source[..., :3] + strength * noise).astype(np.uint8)
            elif engine == "edit/inpaint":
                if "mask" in files:
                    with Image.open(io.BytesIO(files["mask"])) as m:
                        generate = np.asarray(m.convert("L")) >= 128
                    if generate.shape != (h, w):
                        return self._error(400, "bad_request", "mask: must be the image's size")
                else:
                    generate = source[..., 3] < 128
                grow = int(fields.get("grow_mask", "5"))
                if not 0 <= grow <= 100:
                    return self._error(400, "bad_request", "grow_mask: must be 0..100")
                out = np.where(generate[..., None], rng.integers(0, 256, size=(h, w, 3)), source[..., :3])
                out = out.astype(np.uint8)
            elif engine == "edit/outpaint":
                sides = {k: int(fields.get(k, "0")) for k in ("left", "right", "up", "down")}
                if not all(0 <= v <= 2000 for v in sides.values()) or not any(sides.values()):
                    return self._error(400, "bad_request", "left/right/up/down: 0..2000, at least one above 0")
                if not 0 <= float(fields.get("creativity", "0.5")) <= 1:
                    return self._error(400, "bad_request", "creativity: must be 0..1")
                H, W = h + sides["up"] + sides["down"], w + sides["left"] + sides["right"]
                out = rng.integers(0, 256, size=(H, W, 3)).astype(np.uint8)
                out[sides["up"] : sides["up"] + h, sides["left"] : sides["left"] + w] = source[..., :3]
            else:  # upscale/conservative
                if not 0.2 <= float(fields.get("creativity", "0.35")) <= 0.5:
                    return self._error(400, "bad_request", "creativity: must be 0.2..0.5")
                factor = max(1.0, min(4.0, (4 * 2**20 / (w * h)) ** 0.5))
                out = np.asarray(Image.fromarray(source[..., :3]).resize((round(w * factor), round(h * factor))))
            with state.lock:
                state.credits -= CREDITS[engine]
            buf = io.BytesIO()
            Image.fromarray(out).save(buf, format="PNG")
            data = buf.getvalue()
            if accept == "application/json":
                import base64

                return self._json(
                    200, {"image": base64.b64encode(data).decode(), "finish_reason": "SUCCESS", "seed": seed}
                )
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(data)))
            self.send_header("finish-reason", "SUCCESS")
            self.send_header("seed", str(seed))
            self.send_header("x-request-id", uuid.uuid4().hex)
            self.end_headers()
            self.wfile.write(data)

    return Handler


class StabilityStub:
    """`with StabilityStub(key) as stub:` → stub.url, stub.state (fault knobs, requests seen)."""

    def __init__(self, key: str, **state):
        self.state = StubState(key=key, **state)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StabilityStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
