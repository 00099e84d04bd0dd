"""Post-processing: platform-sized variants, watermark, and provenance metadata in every file.

A render leaves the generator as one full-size master PNG (never watermarked) plus one variant
per requested preset: resized/cropped to the platform size, optionally watermarked, encoded as
PNG, WebP or JPEG. Every file carries:

- AUTOMATIC1111's `parameters` infotext (PNG text chunk, or EXIF UserComment in JPEG/WebP), the
  de-facto format read by A1111, ComfyUI importers, Civitai and most image browsers;
- the full `ImageMetadata` as JSON (PNG iTXt `imagefab`, and inside the XMP packet);
- an XMP packet declaring the IPTC digital source type "trainedAlgorithmicMedia", the marker
  platforms read to label AI-generated images.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from PIL import ExifTags, Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, Field, field_validator

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    width: int
    height: int
    description: str


def _presets(*presets: Preset) -> Mapping[str, Preset]:
    # Read-only: Ray workers import this module afresh, so a mutation would differ per process.
    return MappingProxyType({preset.name: preset for preset in presets})


PRESETS: Mapping[str, Preset] = _presets(
    Preset("instagram_square", 1080, 1080, "Instagram feed post, 1:1"),
    Preset("instagram_portrait", 1080, 1350, "Instagram feed post, 4:5"),
    Preset("instagram_story", 1080, 1920, "Instagram story / reel cover, 9:16"),
    Preset("tiktok", 1080, 1920, "TikTok, 9:16"),
    Preset("linkedin", 1200, 627, "LinkedIn shared link / feed image, 1.91:1"),
    Preset("facebook_feed", 1200, 630, "Facebook feed / link image, 1.91:1"),
    Preset("x_post", 1600, 900, "X (Twitter) in-stream image, 16:9"),
    Preset("pinterest", 1000, 1500, "Pinterest standard pin, 2:3"),
    Preset("ecommerce_square", 2000, 2000, "Marketplace product image, 1:1, zoomable"),
    Preset("thumbnail", 256, 256, "Catalog / gallery thumbnail, 1:1"),
    Preset("web_hero", 1920, 1080, "Website hero banner, 16:9"),
)

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

ImageFormat = Literal["png", "webp", "jpeg"]
Fit = Literal["cover", "contain"]
WatermarkPosition = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]


class WatermarkSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(min_length=1, max_length=200)
    opacity: float = Field(0.35, gt=0.0, le=1.0)
    position: WatermarkPosition = "bottom-right"
    # Text height as a share of the image height, so a watermark looks the same on every preset.
    scale: float = Field(0.04, gt=0.0, le=0.5)

    @field_validator("text")
    @classmethod
    def _visible_text(cls, text: str) -> str:
        if not text.strip():
            raise ValueError(f"watermark `text` must contain visible characters, but is {text!r}")
        return text


class PostprocessSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    presets: tuple[str, ...] = ()
    format: ImageFormat = "png"
    quality: int = Field(90, ge=1, le=100)
    # Level 1 encodes 5.7x faster than Pillow's default 6 (71 vs 403 ms for a 1024x1024 photo)
    # for a file 13% larger; at thousands of renders an hour, encode time is worker time.
    png_compress_level: int = Field(1, ge=0, le=9)
    watermark: WatermarkSettings | None = None
    fit: Fit = "cover"

    @field_validator("presets")
    @classmethod
    def _known_presets(cls, presets: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in presets if name not in PRESETS]
        if unknown:
            raise ValueError(f"unknown presets {unknown}; valid presets are {sorted(PRESETS)}")
        if len(set(presets)) != len(presets):
            raise ValueError(f"presets are listed more than once in {list(presets)}")
        return presets


# ---------------------------------------------------------------------------------------------
# Geometry and watermark
# ---------------------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB, transparency composited over white (JPEG has no alpha).

    Returns `image` itself when it is already RGB: callers must not draw on the result.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_preset(image: Image.Image, preset: Preset, fit: Fit = "cover") -> Image.Image:
    """Resize `image` to exactly `preset.width` x `preset.height` (LANCZOS), returning RGB.

    cover: fill the frame and centre-crop the overflow. contain: fit inside and pad with white.
    """
    image = _to_rgb(image)
    width, height = image.size
    target = (preset.width, preset.height)
    if fit == "cover":
        # Crop the source to the target aspect (centred, sub-pixel) and resample once: the same
        # frame as "scale until both sides cover, then centre-crop", without a second resampling.
        if width * preset.height > height * preset.width:
            crop_width = height * preset.width / preset.height
            left = (width - crop_width) / 2
            box = (left, 0.0, left + crop_width, float(height))
        else:
            crop_height = width * preset.height / preset.width
            top = (height - crop_height) / 2
            box = (0.0, top, float(width), top + crop_height)
        return image.resize(target, Image.Resampling.LANCZOS, box=box)
    if fit == "contain":
        scale = min(preset.width / width, preset.height / height)
        size = (
            min(preset.width, max(1, round(width * scale))),
            min(preset.height, max(1, round(height * scale))),
        )
        canvas = Image.new("RGB", target, (255, 255, 255))
        offset = ((preset.width - size[0]) // 2, (preset.height - size[1]) // 2)
        canvas.paste(image.resize(size, Image.Resampling.LANCZOS), offset)
        return canvas
    raise ValueError(f"`fit` must be 'cover' or 'contain', but is {fit!r}")


def apply_watermark(image: Image.Image, settings: WatermarkSettings) -> Image.Image:
    """Return an RGB copy of `image` with semi-transparent text in `settings.position`.

    White text with a dark outline, both at `settings.opacity`, stays legible on light and dark
    images alike. Long text is shrunk to fit 90% of the width, but not below 6 px.
    """
    base = _to_rgb(image).convert("RGBA")
    width, height = base.size
    overlay = Image.new("RGBA", base.size, (255, 255, 255, 0))
    draw = ImageDraw.Draw(overlay)

    font_px = max(8, round(settings.scale * height))
    font, stroke, bbox = _fitted_font(draw, settings.text, font_px, max_width=0.9 * width)
    text_width, text_height = bbox[2] - bbox[0], bbox[3] - bbox[1]
    margin = max(2, round(0.02 * min(width, height)))
    if settings.position == "center":
        x, y = (width - text_width) / 2, (height - text_height) / 2
    else:
        vertical, horizontal = settings.position.split("-")
        x = margin if horizontal == "left" else width - margin - text_width
        y = margin if vertical == "top" else height - margin - text_height

    alpha = round(255 * settings.opacity)
    # textbbox is relative to the anchor, which includes the font's top bearing; subtract it so
    # the ink, not the anchor, sits at (x, y).
    draw.text(
        (x - bbox[0], y - bbox[1]),
        settings.text,
        font=font,
        fill=(255, 255, 255, alpha),
        stroke_width=stroke,
        stroke_fill=(0, 0, 0, alpha),
    )
    return Image.alpha_composite(base, overlay).convert("RGB")


def _fitted_font(
    draw: ImageDraw.ImageDraw, text: str, font_px: int, max_width: float
) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int, tuple[float, float, float, float]]:
    for _ in range(3):  # text width is close to linear in size; a few rounds converge
        font = ImageFont.load_default(size=font_px)
        stroke = max(1, round(font_px / 16))
        bbox = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        text_width = bbox[2] - bbox[0]
        if text_width <= max_width or font_px <= 6:
            break
        font_px = max(6, int(font_px * max_width / text_width))
    return font, stroke, bbox


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class LoraRef(NamedTuple):
    name: str
    weight: float
    sha256: str


@dataclass(frozen=True)
class ImageMetadata:
    """What made one image; embedded in every file written for it.

    `model_hash` and each LoRA's `sha256` are the sha256 of the weights file (64 hex), or ""
    when unknown. `loras` accepts plain `(name, weight, sha256)` tuples.
    """

    image_id: str
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_name: str
    model_hash: str
    loras: tuple[LoraRef, ...] = ()
    run_id: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise numbers so that "CFG scale: 5.0" and the JSON do not depend on whether the
        # caller passed 5 or 5.0 (or a numpy scalar, which json cannot write).
        for name in ("steps", "seed", "width", "height"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        object.__setattr__(self, "model_hash", _check_sha256("model_hash", self.model_hash))
        loras = tuple(
            LoraRef(str(name), float(weight), _check_sha256(f"loras[{i}].sha256", sha256))
            for i, (name, weight, sha256) in enumerate(self.loras)
        )
        object.__setattr__(self, "loras", loras)
        # A private copy: the caller's dict must not change what is embedded later.
        object.__setattr__(self, "extra", {str(k): str(v) for k, v in self.extra.items()})

    def infotext(self) -> str:
        """AUTOMATIC1111's `parameters` text: prompt, optional negative line, parameter line."""
        prompt = self.prompt
        # A1111 activates LoRAs with <lora:name:weight> in the prompt and writes the prompt as
        # typed; readers (Civitai, A1111's "send to txt2img") rely on finding them there.
        tags = [f"<lora:{lora.name}:{lora.weight:g}>" for lora in self.loras if f"<lora:{lora.name}:" not in prompt]
        if tags:
            prompt = " ".join([prompt, *tags]) if prompt else " ".join(tags)

        params: list[tuple[str, Any]] = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", self.cfg_scale),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
        ]
        if self.model_hash:
            # A1111's model "shorthash": the first 10 hex of the file's sha256 (Civitai "AutoV2").
            params.append(("Model hash", self.model_hash[:10]))
        params.append(("Model", self.model_name))
        if self.loras:
            # A1111 writes 12 hex of its own "addnet" hash here; we only know the file's sha256,
            # whose 10-hex prefix is the AutoV2 id that Civitai resolves.
            lora_hashes = ", ".join(f"{lora.name}: {lora.sha256[:10]}" for lora in self.loras)
            params.append(("Lora hashes", lora_hashes))
        params.append(("imagefab image_id", self.image_id))

        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        line = ", ".join(f"{key}: {_quote(value)}" for key, value in params)
        return f"{prompt}{negative}\n{line}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "sampler": self.sampler,
            "cfg_scale": self.cfg_scale,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "model_name": self.model_name,
            "model_hash": self.model_hash,
            "loras": [lora._asdict() for lora in self.loras],
            "run_id": self.run_id,
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageMetadata:
        """Inverse of `to_dict` (e.g. on `read_metadata(...)["imagefab"]`)."""
        fields = dict(data)
        fields["loras"] = tuple(LoraRef(**lora) for lora in fields.get("loras", ()))
        return cls(**fields)


def _check_sha256(name: str, value: str) -> str:
    value = value.lower()
    if value and not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"`{name}` must be a sha256 hex digest (64 hex characters) or '', but is {value!r}")
    return value


def _quote(value: Any) -> str:
    """A1111's rule: a value containing ',', ':' or a newline is written as a JSON string."""
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


# Keys A1111 writes: words with spaces, dashes, slashes ("Hires upscale", "Lora hashes").
_PARAM_KEY = re.compile(r"\w[\w \-/.+()]*")
_LORA_TAG = re.compile(r"<lora:([^:<>]+):([^:<>]+)(?::[^<>]*)?>")
_SIZE = re.compile(r"(\d+)x(\d+)")


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse A1111 `parameters` text back into a dict.

    Returns "prompt", "negative_prompt" and "loras" (`[(name, weight)]` from the prompt's
    <lora:...> tags), plus from the parameter line: "steps", "sampler", "cfg_scale", "seed",
    "size", "width", "height", "model_hash", "model", "lora_hashes" (`{name: hash}`),
    "image_id", and any other parameter under its A1111 name. Quoted values may contain commas,
    colons and newlines. A value that does not convert (e.g. "Steps: many") is kept as text.
    """
    lines = text.split("\n")
    params = _parse_param_line(lines[-1])
    # A1111's own heuristic: a last line with fewer than 3 "key: value" pairs is still prompt.
    if params is not None and len(params) >= 3:
        lines = lines[:-1]
    else:
        params = []

    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith("Negative prompt:"):
            negative_lines = [line.removeprefix("Negative prompt:").removeprefix(" ")]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    prompt = "\n".join(prompt_lines)

    result: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": "\n".join(negative_lines or []),
        "loras": [(name, _convert(weight, float)) for name, weight in _LORA_TAG.findall(prompt)],
    }
    for key, value in params:
        if key == "Steps":
            result["steps"] = _convert(value, int)
        elif key == "Sampler":
            result["sampler"] = value
        elif key == "CFG scale":
            result["cfg_scale"] = _convert(value, float)
        elif key == "Seed":
            result["seed"] = _convert(value, int)
        elif key == "Size":
            result["size"] = value
            if match := _SIZE.fullmatch(value):
                result["width"], result["height"] = int(match[1]), int(match[2])
        elif key == "Model hash":
            result["model_hash"] = value
        elif key == "Model":
            result["model"] = value
        elif key == "Lora hashes":
            pairs = (item.rpartition(":") for item in value.split(","))
            result["lora_hashes"] = {name.strip(): digest.strip() for name, _, digest in pairs if name.strip()}
        elif key == "imagefab image_id":
            result["image_id"] = value
        else:
            result[key] = value
    return result


def _convert(value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        return value


def _parse_param_line(line: str) -> list[tuple[str, str]] | None:
    """Split `Key: value, Key: "quoted, value", ...`; None when the line is not of that shape."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i == n:
            break
        colon = line.find(":", i)
        if colon < 0:
            return None
        key = line[i:colon].strip()
        if not _PARAM_KEY.fullmatch(key):
            return None
        i = colon + 1
        while i < n and line[i] == " ":
            i += 1
        if i < n and line[i] == '"':
            end = _closing_quote(line, i)
            if end is None:
                return None
            try:
                value = json.loads(line[i : end + 1])
            except json.JSONDecodeError:
                return None
            i = end + 1
            while i < n and line[i] == " ":
                i += 1
            if i < n and line[i] != ",":
                return None
            i += 1
        else:
            comma = line.find(",", i)
            comma = n if comma < 0 else comma
            value = line[i:comma].strip()
            i = comma + 1
        pairs.append((key, value))
    return pairs


def _closing_quote(line: str, start: int) -> int | None:
    i = start + 1
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == '"':
            return i
        else:
            i += 1
    return None


# ---------------------------------------------------------------------------------------------
# XMP
# ---------------------------------------------------------------------------------------------

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# imagefab publishes no namespace document; the reserved .invalid domain (RFC 2606) says so.
_NS_IMAGEFAB = "https://imagefab.invalid/ns/xmp/1.0/"
# JPEG keeps EXIF and XMP each in one APP1 segment of at most 65533 bytes; XMP's share loses
# the 29-byte namespace header.
_JPEG_MAX_SEGMENT_BYTES = 65533
_JPEG_XMP_HEADER_BYTES = 29

# Characters XML 1.0 cannot carry at all; a prompt may contain them, the packet must not.
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    text = _XML_INVALID.sub("\ufffd", text)
    # &#13; keeps a carriage return that an XML parser would otherwise turn into a newline.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _xml_attr(text: str) -> str:
    return _xml_text(text).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


def _xmp_packet(metadata: ImageMetadata | None) -> bytes:
    """XMP declaring AI provenance; with metadata also the prompt, image id and full JSON."""
    properties = ""
    if metadata is not None:
        properties += (
            f'\n   <dc:description><rdf:Alt><rdf:li xml:lang="x-default">{_xml_text(metadata.prompt)}'
            f"</rdf:li></rdf:Alt></dc:description>"
            f"\n   <dc:identifier>{_xml_text(metadata.image_id)}</dc:identifier>"
            f"\n   <imagefab:Metadata>{_xml_text(metadata.to_json())}</imagefab:Metadata>"
        )
        properties += _xmp_rights(metadata.extra)
    packet = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="{_NS_RDF}">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:Iptc4xmpExt="{_NS_IPTC_EXT}"
    xmlns:imagefab="{_NS_IMAGEFAB}"
    xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/"
    xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/"
    Iptc4xmpExt:DigitalSourceType="{_xml_attr(DIGITAL_SOURCE_TYPE)}"
    xmp:CreatorTool="imagefab">{properties}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return packet.encode("utf-8")


def _xmp_rights(extra: Mapping[str, str]) -> str:
    """IPTC rights fields from `extra`'s `rights.licence`, `rights.owner`, `rights.notes`:
    Copyright Notice (dc:rights), Rights Usage Terms (xmpRights:UsageTerms), Copyright Owner."""
    licence, owner, notes = (extra.get(f"rights.{key}", "") for key in ("licence", "owner", "notes"))
    out = ""
    if owner:
        out += (
            f'\n   <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">© {_xml_text(owner)}</rdf:li></rdf:Alt></dc:rights>'
            f'\n   <plus:CopyrightOwner><rdf:Seq><rdf:li rdf:parseType="Resource">'
            f"<plus:CopyrightOwnerName>{_xml_text(owner)}</plus:CopyrightOwnerName></rdf:li></rdf:Seq></plus:CopyrightOwner>"
        )
    terms = "; ".join(part for part in (licence, notes) if part)
    if terms:
        out += f'\n   <xmpRights:UsageTerms><rdf:Alt><rdf:li xml:lang="x-default">{_xml_text(terms)}</rdf:li></rdf:Alt></xmpRights:UsageTerms>'
    if licence or owner:
        out += "\n   <xmpRights:Marked>True</xmpRights:Marked>"
    return out


def _parse_xmp(xmp: bytes | str) -> dict[str, Any]:
    """Digital source type and imagefab JSON from an XMP packet; {} when it does not parse."""
    try:
        root = ET.fromstring(xmp)
    except ET.ParseError:
        return {}
    found: dict[str, Any] = {}
    source_key = f"{{{_NS_IPTC_EXT}}}DigitalSourceType"
    for description in root.iter(f"{{{_NS_RDF}}}Description"):
        # XMP allows a simple property as an attribute or as a child element.
        source = description.get(source_key)
        if source is None and (element := description.find(source_key)) is not None:
            source = element.text
        if source:
            found["digital_source_type"] = source.strip()
        element = description.find(f"{{{_NS_IMAGEFAB}}}Metadata")
        if element is not None and element.text:
            with contextlib.suppress(json.JSONDecodeError):
                found["imagefab"] = json.loads(element.text)
    return found


# ---------------------------------------------------------------------------------------------
# Encoding and reading back
# ---------------------------------------------------------------------------------------------

# EXIF 2.3 UserComment starts with an 8-byte character-code id. A1111 writes infotext through
# piexif's UserComment.dump(..., encoding="unicode"): "UNICODE\0" + UTF-16 big-endian, inside
# a big-endian ("MM") TIFF block, which is also what Pillow's Exif() writes by default.
_USER_COMMENT_UNICODE = b"UNICODE\x00"
_USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"


def encode_image(
    image: Image.Image,
    fmt: ImageFormat,
    metadata: ImageMetadata | None = None,
    quality: int = 90,
    png_compress_level: int = 1,
) -> bytes:
    """Encode `image` as PNG, WebP or JPEG with provenance metadata embedded.

    PNG: text `parameters` (A1111 infotext; Pillow stores it as iTXt when it is not Latin-1,
    as A1111 does), iTXt `imagefab` (JSON), iTXt `XML:com.adobe.xmp`. JPEG/WebP: EXIF
    UserComment (infotext, A1111-style) and XMP. The XMP is written even without metadata:
    the image is AI-generated either way.
    """
    if fmt not in ("png", "webp", "jpeg"):
        raise ValueError(f"`fmt` must be 'png', 'webp' or 'jpeg', but is {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"`quality` must be in 1..100, but is {quality}")
    if not 0 <= png_compress_level <= 9:
        raise ValueError(f"`png_compress_level` must be in 0..9, but is {png_compress_level}")

    buffer = io.BytesIO()
    xmp = _xmp_packet(metadata)
    if fmt == "png":
        info = PngInfo()
        if metadata is not None:
            info.add_text("parameters", metadata.infotext())
            info.add_itxt("imagefab", metadata.to_json())
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = _to_rgb(image)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=png_compress_level)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[ExifTags.Base.Software] = "imagefab"
    if metadata is not None:
        user_comment = _USER_COMMENT_UNICODE + metadata.infotext().encode("utf-16-be")
        exif[ExifTags.IFD.Exif] = {ExifTags.Base.UserComment: user_comment}
    exif_bytes = exif.tobytes()
    if fmt == "jpeg":
        if len(exif_bytes) > _JPEG_MAX_SEGMENT_BYTES:
            # Truncating would embed a prompt that is not the one used; refuse instead.
            raise ValueError(
                f"the infotext of image {metadata.image_id if metadata else None!r} needs "
                f"{len(exif_bytes)} bytes of EXIF, more than a JPEG segment holds "
                f"({_JPEG_MAX_SEGMENT_BYTES}); use 'png' or 'webp' for prompts this long"
            )
        if len(xmp) > _JPEG_MAX_SEGMENT_BYTES - _JPEG_XMP_HEADER_BYTES:
            # The JSON copy does not fit one APP1 segment: keep the provenance declaration; the
            # EXIF infotext still carries the prompt and the image id.
            xmp = _xmp_packet(None)
        _to_rgb(image).save(buffer, format="JPEG", quality=quality, exif=exif_bytes, xmp=xmp)
    else:
        if image.mode not in ("RGB", "RGBA"):
            image = _to_rgb(image)
        image.save(buffer, format="WEBP", quality=quality, exif=exif_bytes, xmp=xmp)
    return buffer.getvalue()


def encode_master(image: Image.Image, metadata: ImageMetadata | None, png_compress_level: int = 1) -> bytes:
    """The full-size PNG kept as the master copy; never watermarked."""
    return encode_image(image, "png", metadata, png_compress_level=png_compress_level)


def read_metadata(data: bytes) -> dict[str, Any]:
    """Read back what `encode_image` embeds (also from A1111 files).

    Returns "format" ("PNG", "JPEG" or "WEBP") and, when present: "parameters" (infotext),
    "imagefab" (metadata JSON as a dict), "digital_source_type" (from XMP).
    Raises ValueError for bytes that are not a readable PNG/JPEG/WebP.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP"))
        image.load()  # PNG text chunks after the pixel data are only read by load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read metadata from {len(data)} bytes: {e}") from e

    result: dict[str, Any] = {"format": image.format}
    if image.format == "PNG":
        parameters = image.info.get("parameters")
        if isinstance(parameters, str):
            result["parameters"] = parameters
        if isinstance(image.info.get("imagefab"), str):
            with contextlib.suppress(json.JSONDecodeError):
                result["imagefab"] = json.loads(image.info["imagefab"])
    else:
        exif = image.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        if isinstance(comment, bytes) and (parameters := _decode_user_comment(comment, exif.endian)):
            result["parameters"] = parameters

    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if xmp:
        for key, value in _parse_xmp(xmp).items():
            result.setdefault(key, value)
    return result


def _decode_user_comment(comment: bytes, endian: str | None) -> str:
    prefix, body = comment[:8], comment[8:]
    if prefix == _USER_COMMENT_UNICODE:
        # EXIF's UNICODE follows the TIFF block's byte order ("MM" from piexif/A1111 and from
        # us); a byte-order mark, which some writers add, overrides it.
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        return body.decode("utf-16-le" if endian == "<" else "utf-16-be", errors="replace")
    if prefix == _USER_COMMENT_ASCII:
        return body.decode("ascii", errors="replace").rstrip("\x00")
    return comment.decode("utf-8", errors="replace").rstrip("\x00")


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    preset: str
    width: int
    height: int
    format: ImageFormat
    data: bytes


def render_variants(
    image: Image.Image,
    settings: PostprocessSettings,
    metadata: ImageMetadata | None = None,
    mark: Callable[[Image.Image], Image.Image] | None = None,
) -> list[Variant]:
    """One encoded variant per preset in `settings.presets`, in that order.

    `mark` (the invisible watermark) is applied to each variant's final pixels, before encoding.
    """
    variants = []
    for name in settings.presets:
        preset = PRESETS[name]
        # 1. Resize/crop to the platform size
        variant = fit_to_preset(image, preset, settings.fit)
        # 2. Watermark after resizing, so its size is relative to what the viewer sees
        if settings.watermark is not None:
            variant = apply_watermark(variant, settings.watermark)
        if mark is not None:
            variant = mark(variant)
        # 3. Encode with the metadata
        data = encode_image(variant, settings.format, metadata, settings.quality, settings.png_compress_level)
        variants.append(Variant(name, preset.width, preset.height, settings.format, data))
    return variants
