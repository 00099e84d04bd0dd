"""AUTOMATIC1111's `parameters` infotext: written from an `ImageMetadata`, parsed back from any writer.

The de-facto format read by A1111, ComfyUI importers, Civitai and most image browsers: the prompt
(with `<lora:name:weight>` tags), an optional "Negative prompt:" line, and one line of
`Key: value` parameters. Where it goes in a file: `png.py` (a text chunk) and `exif.py`
(JPEG/WebP UserComment).
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.metadata.record import ImageMetadata
from app.request import format_lora_tag, parse_lora_tags


def format_infotext(metadata: ImageMetadata) -> str:
    """AUTOMATIC1111's `parameters` text: prompt, optional negative line, parameter line."""
    prompt = metadata.prompt
    # A1111 activates LoRAs with <lora:name:weight> in the prompt and writes the prompt as
    # typed; readers (Civitai, A1111's "send to txt2img") rely on finding them there.
    tags = [
        format_lora_tag(lora.name, lora.weight)
        for lora in metadata.loras
        if lora.name not in {name for name, _ in parse_lora_tags(prompt)[1]}
    ]
    if tags:
        prompt = " ".join([prompt, *tags]) if prompt else " ".join(tags)

    params: list[tuple[str, Any]] = [
        ("Steps", metadata.steps),
        ("Sampler", metadata.sampler),
        ("CFG scale", metadata.cfg_scale),
        ("Seed", metadata.seed),
        ("Size", f"{metadata.width}x{metadata.height}"),
    ]
    if metadata.model_hash:
        # A1111's model "shorthash": the first 10 hex of the file's sha256 (Civitai "AutoV2").
        params.append(("Model hash", metadata.model_hash[:10]))
    params.append(("Model", metadata.model_name))
    params += _conditioning_params(metadata)
    if metadata.loras:
        # A1111 writes 12 hex of its own "addnet" hash here; we only know the file's sha256,
        # whose 10-hex prefix is the AutoV2 id that Civitai resolves.
        lora_hashes = ", ".join(f"{lora.name}: {lora.sha256[:10]}" for lora in metadata.loras)
        params.append(("Lora hashes", lora_hashes))
    params.append(("imagefab image_id", metadata.image_id))

    negative = f"\nNegative prompt: {metadata.negative_prompt}" if metadata.negative_prompt else ""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in params)
    return f"{prompt}{negative}\n{line}"


def _conditioning_params(metadata: ImageMetadata) -> list[tuple[str, Any]]:
    """What A1111 writes for its img2img tab: `Denoising strength` always, `Mask blur` with a mask
    (inpaint; our outpaint is an inpaint of the extended canvas), and for an upscale what its "SD
    upscale" script writes (a Lanczos resize, then img2img over overlapping tiles)."""
    cond = metadata.conditioning
    if not cond:
        return []
    params: list[tuple[str, Any]] = [("Denoising strength", _number(cond.get("strength", 0.0)))]
    mode = metadata.mode
    if mode in ("inpaint", "outpaint"):
        params.append(("Mask blur", int(cond.get("mask_blur", 0))))
    elif mode == "upscale":
        params += [("SD upscale overlap", int(cond.get("tile_overlap", 0))), ("SD upscale upscaler", "Lanczos")]
    return params


def _number(value: float) -> str:
    """A float as A1111 prints it (`0.75`, `1.0`): Python's shortest repr."""
    return repr(float(value))


def _quote(value: Any) -> str:
    """A1111's rule: a value containing ',', ':' or a newline is written as a JSON string."""
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


# Keys A1111 writes: words with spaces, dashes, slashes ("Hires upscale", "Lora hashes").
_PARAM_KEY = re.compile(r"\w[\w \-/.+()]*")
_SIZE = re.compile(r"(\d+)x(\d+)")


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse A1111 `parameters` text back into a dict.

    Returns "prompt", "negative_prompt" and "loras" (`[(name, weight)]` from the prompt's
    <lora:...> tags), plus from the parameter line: "steps", "sampler", "cfg_scale", "seed",
    "size", "width", "height", "model_hash", "model", "lora_hashes" (`{name: hash}`),
    "image_id", "denoising_strength", "mask_blur", and any other parameter under its A1111 name. Quoted values may contain commas,
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
        "loras": [(name, _convert(weight, float)) for name, weight in parse_lora_tags(prompt)[1]],
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
        elif key == "Denoising strength":
            result["denoising_strength"] = _convert(value, float)
        elif key == "Mask blur":
            result["mask_blur"] = _convert(value, int)
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
