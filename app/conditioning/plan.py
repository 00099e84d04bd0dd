"""From an input image (and mask) to what the pipeline is given, and back to the output's pixels.

Three steps, each used by every entrance (a bulk row, an HTTP upload, `regenerate`):
- `plan_request`: check the inputs against a mode's settings and decide the output size; returns
  the request's `Conditioning` (its lineage: URIs, sha256s, settings). Expansion calls it, so a
  bad input is a failed row before anything renders.
- `prepare`: the arrays the pipeline needs: the init image at the render size, the inpainting
  mask, the pixels to paste back, the tiles of an upscale.
- `finish`: the generated pixels → the output: the kept region pasted back byte for byte (outside
  the blend band), an inpainting canvas cropped back to the input's size, and the measures QC and
  the catalog record (`Measures`).

The modes, and the output size each renders at:
- `img2img`: the request's width x height; the input meets it by `resize_mode` (`crop`: scaled to
  cover and centred, A1111's "crop and resize"; `fill`: scaled to fit and the rest filled from its
  edges, "resize and fill"; `stretch`: "just resize").
- `inpaint`: the input's own size, so kept pixels stay where they were; the mask is the mask image
  (white = generate) or else the image's alpha (transparent = generate). Sides that are not
  multiples of 8 are rendered on a canvas padded to the next multiple and cropped back.
- `outpaint`: a canvas of the target ratio or size holding the original at its own resolution
  (app/conditioning/outpaint.py); a packshot's transparent background is generated too.
- `upscale`: the input x `scale` (Lanczos), refined by img2img at low strength in overlapping
  tiles blended with raised-cosine weights (SDXL's "hires fix").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from app.conditioning.errors import ConditioningError
from app.conditioning.keep import kept_region_difference, paste_back
from app.conditioning.loading import InputImage, InputLimits, load_input_image, resolve_uri
from app.conditioning.masks import distance_inside, mask_from_alpha, mask_from_image, model_mask
from app.conditioning.measures import Measures
from app.conditioning.outpaint import _filled, canvas_size, outpaint_canvas, parse_target
from app.conditioning.seams import seam_score
from app.conditioning.tiles import TilePlan, plan_tiles, tile_seam_score, upscaled_size
from app.request import MODES, Conditioning

CONDITIONED_MODES = MODES[1:]
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0, "outpaint": 1.0, "upscale": 0.3}
RESIZE_MODES = ("crop", "fill", "stretch")
MIN_SIDE, MAX_SIDE = 64, 4096  # what one pipeline call renders (app/spec.py's sizes)
MAX_UPSCALE_SIDE = 8192  # an upscale's output, rendered in tiles


@dataclass(frozen=True)
class ModeSettings:
    """A mode and its settings, as a spec's `image` section or an HTTP request gives them."""

    mode: str
    strength: float | None = None  # None: the mode's default (`DEFAULT_STRENGTH`)
    mask_blur: int = 4
    blend_px: int = 4
    target: str = ""
    anchor: str = "center"
    fill: str = "edge"
    resize_mode: str = "crop"
    scale: float = 2.0
    tile: int = 1024
    tile_overlap: int = 128

    def __post_init__(self) -> None:
        if self.mode not in CONDITIONED_MODES:
            raise ConditioningError("mode", f"mode {self.mode!r} is not one of {', '.join(CONDITIONED_MODES)}")
        s = self.effective_strength
        if not (0.0 < s <= 1.0):  # also refuses NaN
            raise ConditioningError("strength", f"strength must be in (0, 1], got {s}")
        if not 0 <= self.mask_blur <= 64 or not 0 <= self.blend_px <= 64:
            raise ConditioningError(
                "mask_band", f"mask_blur ({self.mask_blur}) and blend_px ({self.blend_px}) must be in 0..64"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ConditioningError("resize_mode", f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.mode == "outpaint" and not self.target:
            raise ConditioningError("outpaint_target", "outpaint needs a target ratio, size or platform")

    @property
    def effective_strength(self) -> float:
        return DEFAULT_STRENGTH[self.mode] if self.strength is None else float(self.strength)


@dataclass(frozen=True)
class Planned:
    conditioning: Conditioning
    width: int  # of the output
    height: int


def load_inputs(
    image_uri: str, mask_uri: str = "", base_dir: str | None = None, limits: InputLimits | None = None
) -> tuple[InputImage, InputImage | None]:
    """The input image and its mask image (None without one), read and checked within `limits`;
    their `uri` is the resolved one (`resolve_uri`)."""
    image = load_input_image(resolve_uri(image_uri, base_dir), None, limits)
    mask = load_input_image(resolve_uri(mask_uri, base_dir), None, limits) if mask_uri else None
    return image, mask


def reload_inputs(cond: Conditioning, limits: InputLimits | None = None) -> tuple[InputImage, InputImage | None]:
    """The inputs a request names, read again; `input_changed` when their bytes are not the ones
    its image_id was made from."""
    image, mask = load_inputs(cond.image_uri, cond.mask_uri, None, limits)
    for what, loaded, want in (("image", image, cond.image_sha256), ("mask", mask, cond.mask_sha256)):
        if loaded is not None and want and loaded.sha256 != want:
            raise ConditioningError(
                "input_changed",
                f"the input {what} {loaded.uri} changed since the request was made "
                f"(sha256 {loaded.sha256[:12]}…, the request was made from {want[:12]}…)",
            )
    return image, mask


def plan_request(
    settings: ModeSettings, image: InputImage, mask: InputImage | None, width: int, height: int
) -> Planned:
    """The request's conditioning and output size; `ConditioningError` for inputs the mode cannot use.
    `width` x `height` is the size asked for (used by img2img)."""
    if mask is not None and settings.mode in ("img2img", "upscale"):
        raise ConditioningError("mask_size", f"{settings.mode} takes no mask (got {mask.uri})")
    cond = Conditioning(
        mode=settings.mode,
        image_uri=image.uri,
        image_sha256=image.sha256,
        mask_uri=mask.uri if mask is not None else "",
        mask_sha256=mask.sha256 if mask is not None else "",
        strength=settings.effective_strength,
        source_width=image.width,
        source_height=image.height,
    )
    if settings.mode == "img2img":
        _check_render_size(width, height, "img2img")
        cond = replace(cond, resize_mode=settings.resize_mode)
        return Planned(cond, width, height)
    if settings.mode == "upscale":
        w, h = upscaled_size(image.width, image.height, settings.scale)
        if max(w, h) > MAX_UPSCALE_SIDE:
            raise ConditioningError(
                "upscale_settings",
                f"{image.width}x{image.height} x{settings.scale:g} is {w}x{h}, over {MAX_UPSCALE_SIDE}",
            )
        plan_tiles(w, h, settings.tile, settings.tile_overlap)  # checks tile and overlap
        cond = replace(cond, scale=float(settings.scale), tile=settings.tile, tile_overlap=settings.tile_overlap)
        return Planned(cond, w, h)
    cond = replace(cond, mask_blur=settings.mask_blur, blend_px=settings.blend_px)
    if settings.mode == "inpaint":
        generate = _generate_mask(image, mask)
        _check_render_size(_ceil8(image.width), _ceil8(image.height), "inpaint")
        _check_band(~generate, settings.blend_px)
        return Planned(replace(cond, mask_source="mask" if mask is not None else "alpha"), image.width, image.height)
    target = parse_target(settings.target)
    w, h, _ = canvas_size(image.width, image.height, target)
    _check_render_size(w, h, "outpaint")
    canvas = outpaint_canvas(image.rgb, target, settings.anchor, settings.fill)  # type: ignore[arg-type]  # checks it
    keep = ~_outpaint_generate(canvas.generate, canvas.box, image, mask)
    _check_band(keep, settings.blend_px)
    source = "canvas" + ("+mask" if mask is not None else "+alpha" if _has_transparency(image) else "")
    cond = replace(cond, target=settings.target, anchor=settings.anchor, fill=settings.fill, mask_source=source)
    return Planned(cond, w, h)


@dataclass(frozen=True, eq=False)
class Prepared:
    """What the pipeline is given for one request."""

    mode: str
    image: np.ndarray = field(repr=False)  # [H, W, 3] uint8 at the render size (the init image)
    generate: np.ndarray | None = field(default=None, repr=False)  # [H, W] bool, inpaint/outpaint
    mask: np.ndarray | None = field(default=None, repr=False)  # [H, W] uint8 for the model (255 = generate)
    original: np.ndarray | None = field(default=None, repr=False)  # [H, W, 3] pasted back over the kept region
    output_size: tuple[int, int] = (0, 0)  # (width, height) after cropping
    tiles: TilePlan | None = None
    source: np.ndarray | None = field(default=None, repr=False)  # upscale: the input's RGB
    blend_px: int = 0

    @property
    def render_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[0])


def prepare(cond: Conditioning, image: InputImage, mask: InputImage | None, width: int, height: int) -> Prepared:
    """The pipeline's inputs for a planned request (`width` x `height`: its output size)."""
    if cond.mode == "img2img":
        return Prepared("img2img", _resized(image.rgb, width, height, cond.resize_mode), output_size=(width, height))
    if cond.mode == "upscale":
        big = np.asarray(
            Image.fromarray(np.ascontiguousarray(image.rgb)).resize((width, height), Image.Resampling.LANCZOS)
        )
        plan = plan_tiles(width, height, cond.tile, cond.tile_overlap)
        return Prepared("upscale", big, output_size=(width, height), tiles=plan, source=image.rgb)
    if cond.mode == "inpaint":
        generate = _generate_mask(image, mask)
        rgb = np.array(image.rgb)
        if mask is None:  # under a transparent background the RGB is arbitrary: start from a flat colour
            rgb[generate] = np.rint(rgb[~generate].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        rw, rh = _ceil8(image.width), _ceil8(image.height)
        if (rw, rh) != (image.width, image.height):  # pad to multiples of 8; the padding is generated
            pad = ((0, rh - image.height), (0, rw - image.width))
            rgb = np.pad(rgb, (*pad, (0, 0)), mode="edge")
            generate = np.pad(generate, pad, constant_values=True)
        canvas, original = rgb, rgb
    else:
        target = parse_target(cond.target)
        placed = outpaint_canvas(image.rgb, target, cond.anchor, cond.fill)  # type: ignore[arg-type]
        generate = _outpaint_generate(placed.generate, placed.box, image, mask)
        canvas, original = placed.pixels, placed.pixels
        if generate.any() and not np.array_equal(generate, placed.generate):  # transparent areas: fill like the canvas
            canvas = np.where(
                generate[:, :, None], _filled(image.rgb, placed.size, placed.box[:2], generate, "mean"), canvas
            )
    return Prepared(
        cond.mode,
        np.ascontiguousarray(canvas),
        generate=generate,
        mask=model_mask(generate, cond.mask_blur),
        original=original,
        output_size=(width, height),
        blend_px=cond.blend_px,
    )


def finish(prepared: Prepared, generated: np.ndarray) -> tuple[np.ndarray, Measures]:
    """The generated pixels [H, W, 3] at the render size → the output [h, w, 3] and its measures."""
    if prepared.mode == "img2img":
        return generated, Measures()
    if prepared.mode == "upscale":
        assert prepared.source is not None and prepared.tiles is not None
        small = Image.fromarray(generated).resize(prepared.source.shape[1::-1], Image.Resampling.BOX)
        diff = float(np.abs(np.asarray(small).astype(np.int16) - prepared.source.astype(np.int16)).mean())
        tile_seam = tile_seam_score(generated, prepared.tiles) if len(prepared.tiles.tiles) > 1 else None
        return generated, Measures(tile_seam=tile_seam, source_difference=diff)
    assert prepared.generate is not None and prepared.original is not None
    width, height = prepared.output_size  # an inpainting canvas's padding is cropped off first
    keep, original = ~prepared.generate[:height, :width], prepared.original[:height, :width]
    pixels = paste_back(np.ascontiguousarray(generated[:height, :width]), original, keep, prepared.blend_px)
    kept = kept_region_difference(pixels, original, keep, prepared.blend_px)
    measures = Measures(
        kept_mean_abs=kept.mean_abs,
        kept_max_abs=float(kept.max_abs),
        kept_pixels=kept.pixels,
        seam=_seam(pixels, keep),
        seam_input=_seam(original, keep),
        generated_sharpness=_generated_sharpness(pixels, ~keep),
    )
    return np.ascontiguousarray(pixels), measures


def exact_region(prepared: Prepared) -> np.ndarray | None:
    """[h, w] bool at the output size: the kept pixels promised byte for byte (farther than the
    blend band from the generated region), or None for modes that keep nothing."""
    if prepared.generate is None:
        return None
    width, height = prepared.output_size
    keep = ~prepared.generate[:height, :width]
    return keep & (distance_inside(keep) > prepared.blend_px)


def tile_seed(seed: int, index: int) -> int:
    """The seed of an upscale's tile `index`: distinct per tile, fixed by the request's seed."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- helpers ------------------------------------------------------------------------------------
def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def _check_render_size(width: int, height: int, mode: str) -> None:
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise ConditioningError(
            "image_pixels", f"{mode} renders at {width}x{height}, outside {MIN_SIDE}..{MAX_SIDE} pixels per side"
        )


def _check_band(keep: np.ndarray, blend_px: int) -> None:
    if not (distance_inside(keep) > blend_px).any():
        raise ConditioningError(
            "mask_band", f"no kept pixel lies farther than blend_px={blend_px} from the generated region"
        )


def _has_transparency(image: InputImage) -> bool:
    return image.alpha is not None and bool((image.alpha < 128).any())


def _generate_mask(image: InputImage, mask: InputImage | None) -> np.ndarray:
    """[H, W] bool, True = generate: from the mask image, else from the image's alpha."""
    if mask is not None:
        return mask_from_image(mask, image)
    if image.alpha is None:
        raise ConditioningError(
            "mask_keeps_none", f"inpaint needs a mask: {image.uri} has no mask image and no alpha channel"
        )
    return mask_from_alpha(image)


def _outpaint_generate(
    canvas_generate: np.ndarray, box: tuple[int, int, int, int], image: InputImage, mask: InputImage | None
) -> np.ndarray:
    """The canvas's new area, plus what the mask (or a transparent background) marks inside the original."""
    x, y, w, h = box
    inside = None
    if mask is not None:
        inside = mask_from_image(mask, image)
    elif _has_transparency(image):
        inside = mask_from_alpha(image)
    if inside is None or inside.shape != (h, w):  # none, or the original was shrunk onto an exact size
        return canvas_generate
    generate = canvas_generate.copy()
    generate[y : y + h, x : x + w] |= inside
    return generate


def _resized(rgb: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """[height, width, 3]: `rgb` brought to the render size by `mode` (crop | fill | stretch)."""
    h, w = rgb.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if (w, h) == (width, height):
        return np.asarray(image)
    if mode == "stretch":
        return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))
    cover = mode == "crop"
    scale = max(width / w, height / h) if cover else min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = np.asarray(image.resize((sw, sh), Image.Resampling.LANCZOS))
    if cover:
        x, y = (sw - width) // 2, (sh - height) // 2
        return np.ascontiguousarray(scaled[y : y + height, x : x + width])
    x, y = (width - sw) // 2, (height - sh) // 2
    generate = np.ones((height, width), dtype=bool)
    generate[y : y + sh, x : x + sw] = False
    out = _filled(scaled, (width, height), (x, y), generate, "edge")
    out[y : y + sh, x : x + sw] = scaled
    return out


def _generated_sharpness(pixels: np.ndarray, generated: np.ndarray) -> float | None:
    """QC's sharpness over the generated pixels (app/qc/checks.py `sharpness`, same scale)."""
    from app.qc.checks import luminance, sharpness

    if int(generated.sum()) < 64:
        return None
    return sharpness(luminance(pixels), subject=generated)


def _seam(pixels: np.ndarray, keep: np.ndarray) -> float | None:
    try:
        return seam_score(pixels, keep)
    except ValueError:  # a ring or its context is empty (a tiny kept region)
        return None
