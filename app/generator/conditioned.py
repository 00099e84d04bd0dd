"""Image-conditioned rendering on a generator's loaded pipeline: img2img, inpaint, outpaint, upscale.

The img2img and inpainting pipelines are made from the generator's own with diffusers'
`from_pipe`: the same UNet, VAE, text encoders and tokenizers (no second copy of the weights on
the device), so the LoRA stack the generator set, its fused projections and its compiled UNet
apply to them as they are. Only the scheduler is handed over per call (the generator sets it per
group of requests).

Each request is rendered alone (its own init image, mask and seed): the inputs are read again by
URI and must still be the bytes the image_id was made from (`reload_inputs`), prepared and
finished by app/conditioning/plan.py, which pastes kept pixels back and measures the output. An
upscale denoises each tile in its own call, seeded by `tile_seed(seed, tile index)`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from app.conditioning.errors import ConditioningError
from app.conditioning.loading import InputLimits
from app.conditioning.measures import Measures
from app.conditioning.plan import Prepared, finish, prepare, reload_inputs, tile_seed
from app.conditioning.tiles import blend_tiles, cut_tiles
from app.generator.overlap import uint8_on_device
from app.generator.vae_decode import decode_latents
from app.request import RenderRequest


class ConditionedRenderer:
    """Renders image-conditioned requests with pipelines that share `pipe`'s modules."""

    def __init__(self, pipe, limits: InputLimits | None = None):
        self.pipe = pipe
        self.limits = limits or InputLimits()
        self._pipes: dict[str, object] = {}

    def pipeline(self, kind: str):
        """The img2img or inpainting pipeline over the generator's modules, with its scheduler."""
        if kind not in self._pipes:
            from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

            cls = StableDiffusionXLImg2ImgPipeline if kind == "img2img" else StableDiffusionXLInpaintPipeline
            derived = cls.from_pipe(self.pipe)
            derived.set_progress_bar_config(disable=True)  # from_pipe does not carry it over
            self._pipes[kind] = derived
        derived = self._pipes[kind]
        derived.scheduler = self.pipe.scheduler  # type: ignore[attr-defined]
        return derived

    def render(self, r: RenderRequest) -> tuple[np.ndarray, float, Measures]:
        """One request → (pixels [H, W, 3] uint8, share of non-finite values, measures)."""
        cond = r.conditioning
        if cond is None:
            raise ValueError(f"request {r.image_id} has no conditioning: render it as txt2img")
        steps_run = int(r.steps * cond.strength)
        if steps_run < 1:
            raise ConditioningError(
                "strength", f"strength {cond.strength} x {r.steps} steps leaves no denoising step: raise either"
            )
        image, mask = reload_inputs(cond, self.limits)
        prepared = prepare(cond, image, mask, r.width, r.height)
        bad = 0.0
        if cond.mode == "upscale":
            assert prepared.tiles is not None
            tiles = []
            for i, tile in enumerate(cut_tiles(prepared.image, prepared.tiles)):
                pixels, tile_bad = self._img2img(r, np.ascontiguousarray(tile), tile_seed(r.seed, i))
                tiles.append(pixels)
                bad = max(bad, tile_bad)
            generated = blend_tiles(tiles, prepared.tiles)
        elif cond.mode == "img2img":
            generated, bad = self._img2img(r, prepared.image, r.seed)
        else:
            generated, bad = self._inpaint(r, prepared)
        pixels, measures = finish(prepared, generated)
        return pixels, bad, measures

    def _call(self, pipe, r: RenderRequest, seed: int, **inputs) -> tuple[np.ndarray, float]:
        latents = pipe(
            prompt=[r.prompt],
            negative_prompt=None if not r.negative_prompt else [r.negative_prompt],
            num_inference_steps=r.steps,
            guidance_scale=r.guidance,
            strength=r.conditioning.strength if r.conditioning else 1.0,
            generator=[torch.Generator("cpu").manual_seed(seed)],  # the same noise on any device
            output_type="latent",
            **inputs,
        ).images
        pixels, bad = uint8_on_device(decode_latents(self.pipe, latents))
        return pixels[0].cpu().numpy(), float(bad[0])

    def _img2img(self, r: RenderRequest, init: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        return self._call(self.pipeline("img2img"), r, seed, image=Image.fromarray(init))

    def _inpaint(self, r: RenderRequest, prepared: Prepared) -> tuple[np.ndarray, float]:
        assert prepared.mask is not None
        width, height = prepared.render_size
        return self._call(
            self.pipeline("inpaint"),
            r,
            r.seed,
            image=Image.fromarray(prepared.image),
            mask_image=Image.fromarray(prepared.mask),  # [H, W] uint8: mode L
            width=width,
            height=height,
        )
