"""Latents to images, as the SDXL pipeline itself decodes them.

The generator stops the pipeline at latents (`output_type="latent"`) so that it can decode a batch
on a stream of its own while the next batch denoises (app/generator/overlap.py). The decode is
diffusers' own steps, copied: tests/test_decode_overlap.py checks that it gives the pipeline's
`output_type="pt"` pixels bit for bit, with and without a VAE's latent statistics.
"""

from __future__ import annotations

import torch


# Copied from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl.StableDiffusionXLPipeline.__call__
# (diffusers 0.42.1: the `if not output_type == "latent":` decode, watermark and `postprocess` at its end), with:
# - `self.upcast_vae()` (deprecated) -> `vae.to(dtype=torch.float32)`, which is what it does, and the latents
#   cast to float32 directly rather than to the dtype of `vae.post_quant_conv`'s first parameter (float32 then);
# - the Apple MPS branch (`self.vae = self.vae.to(latents.dtype)`) and
#   `latents.to(get_module_execution_device(self.vae))` left out: generators run on CUDA or the CPU with the
#   latents already on the VAE's device (no model offloading);
# - `output_type` fixed to "pt" ([B, 3, H, W] in [0, 1]) and no `maybe_free_model_hooks()`.
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """latents: [B, 4, H/8, W/8] -> images: [B, 3, H, W] in [0, 1]."""
    vae = pipe.vae
    # make sure the VAE is in float32 mode, as it overflows in float16
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
        latents = latents.to(torch.float32)
    # unscale/denormalize the latents, with the mean and std if available and not None
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    # cast back to fp16 if needed
    if upcast:
        vae.to(dtype=torch.float16)
    # apply watermark if available
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pt")
