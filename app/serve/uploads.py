"""Input images sent over HTTP: checked before decoding, named by their content, stored only once
the whole request has been planned.

Every dialect's upload (an OpenAI multipart file, an AUTOMATIC1111 base64 string, the native API's
base64 field) goes through `Uploads.accept`:
1. the byte count is checked (a base64 text's before it is decoded), then `decode_input_image`
   (app/conditioning/loading.py) reads the header and refuses too many pixels, a decompression bomb,
   a format the server does not take and an animated image before decoding anything; CMYK, 16-bit
   and palette images are normalised. Each refusal is a `RequestError` with the loader's status
   (413, 415, 422) naming the field and the server's limit.
2. An accepted image is named by its content: `inputs/<sha256>.<png|jpg|webp>` in the output
   store. `store` writes it only after `ServeCore.plan` accepted the whole request, so a refused
   request leaves nothing behind. The generator replica reads the file from there and checks its
   sha256 (`reload_inputs`), the catalog records its URI, and `imagefab regenerate` reads it again.

Masks in another convention than the planner's (white = generate) are redrawn in it as PNGs of
their own (`alpha_mask`, `a1111_mask`) and stored the same way: the mask recorded is the one applied.
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.parser
import email.policy
import io
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from app.conditioning.errors import ConditioningError
from app.conditioning.loading import InputImage, InputLimits, decode_input_image
from app.conditioning.masks import THRESHOLD
from app.serve.bodies import text_problem
from app.serve.errors import RequestError
from app.storage import OutputStore

INPUTS_DIR = "inputs"
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
# The server config's name of the limit each refusal broke, so a 4xx says what to change.
LIMIT_NAMES = {
    "image_too_large": "limits.max_upload_bytes",
    "image_pixels": "limits.max_upload_pixels",
    "image_format": "limits.upload_formats",
}
MAX_FORM_PARTS = 32


@dataclass(frozen=True, eq=False)
class Upload:
    """An accepted input image. `image.uri` names the request's field (`upload 'mask'`: what
    messages say); `uri` is where it is stored, which the request's `Conditioning` records."""

    field: str
    data: bytes
    image: InputImage
    rel: str  # inputs/<sha256>.<ext>, in the output store
    uri: str

    @property
    def sha256(self) -> str:
        return self.image.sha256


class Uploads:
    """Accepts uploads within `limits` and stores them in `output`."""

    def __init__(self, output: OutputStore, limits: InputLimits):
        self.output = output
        self.limits = limits

    def accept(self, data: bytes, field: str) -> Upload:
        """Check and decode `data`; nothing is written."""
        try:
            image = decode_input_image(data, f"upload '{field}'", self.limits)
        except ConditioningError as e:
            limit = LIMIT_NAMES.get(e.reason)
            where = f" (this server's {limit})" if limit else ""
            raise RequestError(e.http_status, field, f"{e.detail}{where}") from None
        rel = f"{INPUTS_DIR}/{image.sha256}.{EXTENSIONS[image.format]}"
        uri = self.output.uri_of(rel)
        if self.output.fs_options:  # an s3 endpoint the reader needs too
            uri = f"{uri}?{self.output.fs_options}"
        return Upload(field=field, data=data, image=image, rel=rel, uri=uri)

    def accept_base64(self, text: object, field: str) -> Upload:
        """A base64 string, or a `data:image/…;base64,` URL, checked for size before decoding."""
        return self.accept(decode_base64(text, field, self.limits.max_bytes), field)

    def store(self, uploads: list[Upload]) -> None:
        """Write each upload under its content's name, unless it is there already."""
        fs, _ = self.output.fs_and_root
        for upload in uploads:
            if fs.get_file_info(self.output.path(upload.rel)).type == pafs.FileType.NotFound:
                self.output.write_bytes(upload.rel, upload.data)

    # --- masks in other conventions -----------------------------------------------------------------
    def alpha_mask(self, mask: Upload) -> Upload:
        """OpenAI's convention: the mask's transparent pixels (alpha < 128) are edited, the rest kept."""
        alpha = mask.image.alpha
        if alpha is None:
            raise RequestError(
                400,
                mask.field,
                f"has no alpha channel ({mask.image.source_mode}): its transparent pixels mark what to edit, "
                "so it must be a PNG or WebP with transparency",
            )
        return self._redrawn(mask, alpha < THRESHOLD)

    def a1111_mask(self, mask: Upload, invert: bool) -> Upload:
        """AUTOMATIC1111's convention: white repaints; a mask with transparency repaints its opaque
        pixels (alpha > 128); `invert` (inpainting_mask_invert=1) repaints the other side."""
        alpha = mask.image.alpha
        if alpha is not None and int(alpha.min()) < 255:
            repaint = alpha > 128
        elif not invert:
            return mask  # already white = repaint: stored as it came
        else:
            luminance = np.asarray(Image.fromarray(np.ascontiguousarray(mask.image.rgb)).convert("L"))  # [H, W]
            repaint = luminance >= THRESHOLD
        return self._redrawn(mask, ~repaint if invert else repaint)

    def _redrawn(self, mask: Upload, generate: np.ndarray) -> Upload:
        """`generate` ([H, W] bool) as a greyscale PNG, white = generate, accepted like an upload."""
        buffer = io.BytesIO()
        Image.fromarray(np.where(generate, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
        return self.accept(buffer.getvalue(), mask.field)


def decode_base64(text: object, field: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or data URL; 413 before decoding when they would exceed `max_bytes`."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(422, field, "is empty: send the image as base64 (optionally a data:image/…;base64, URL)")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(422, field, f"a data URL must be base64 (data:image/png;base64,…), got {header[:40]!r}")
    compact = "".join(text.split())
    decoded_size = len(compact) * 3 // 4
    if decoded_size > max_bytes + 2:
        raise RequestError(
            413,
            field,
            f"is about {decoded_size} bytes, over max_bytes={max_bytes} (this server's limits.max_upload_bytes)",
        )
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, field, f"is not valid base64 ({e})") from None


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    data: bytes

    @property
    def text(self) -> str:
        """The field's value (bytes that are not UTF-8 read as U+FFFD); a NUL is refused, as in JSON."""
        text = self.data.decode("utf-8", errors="replace")
        if problem := text_problem(text):
            raise RequestError(400, self.name, problem)
        return text


def parse_form(content_type: str, body: bytes) -> list[FormPart]:
    """The parts of a `multipart/form-data` body (the standard library's MIME parser: the body's
    size has been checked before). RequestError 400 for anything else or a malformed body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(
            400, "content-type", f"send multipart/form-data (files and fields), not {content_type[:60] or 'nothing'}"
        )
    if "boundary=" not in content_type:
        raise RequestError(400, "content-type", "multipart/form-data without a boundary")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", errors="replace")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
        if not message.is_multipart():
            raise RequestError(400, "body", "is not a readable multipart/form-data body")
        parts = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not isinstance(name, str) or not name:
                raise RequestError(400, "body", "a multipart part has no name (Content-Disposition: form-data; name=…)")
            payload = part.get_payload(decode=True)
            parts.append(FormPart(name, part.get_filename(), payload if isinstance(payload, bytes) else b""))
            if len(parts) > MAX_FORM_PARTS:
                raise RequestError(400, "body", f"more than {MAX_FORM_PARTS} multipart parts")
    except (email.errors.MessageError, ValueError, LookupError, TypeError) as e:  # headers the parser cannot read
        raise RequestError(400, "body", f"is not a readable multipart/form-data body ({e})") from None
    return parts
