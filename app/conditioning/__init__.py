"""Image conditioning: the inputs of img2img, inpainting, outpainting and upscaling.

Pure numpy / Pillow / pyarrow (no Ray, no torch), so the generator actor, the Serve ingress and QC
can all call it:
- `loading`: read an input image by path or URI within limits, normalise it (`InputImage`);
- `masks`: inpainting masks from a mask image or an alpha channel; the model's blurred mask;
- `outpaint`: canvases for platform ratios, their masks and fills; SDXL render sizes;
- `keep`: paste the kept pixels back exactly; measure kept-region differences;
- `tiles`: Lanczos upscale, tile plans and feathered tile blending;
- `seams`: seam scores for QC;
- `plan`: a request's conditioning and output size, the pipeline's inputs, and the output's measures;
- `errors`: `ConditioningError` with a reason code (a failed row in bulk, a 4xx over HTTP).
"""

from app.conditioning.errors import ConditioningError
from app.conditioning.keep import KeptDifference, kept_region_difference, paste_back
from app.conditioning.loading import InputImage, InputLimits, load_input_image
from app.conditioning.masks import mask_from_alpha, mask_from_image, model_mask
from app.conditioning.outpaint import (
    OutpaintCanvas,
    OutpaintTarget,
    outpaint_canvas,
    parse_target,
    render_size_for_ratio,
)
from app.conditioning.seams import seam_score
from app.conditioning.tiles import TilePlan, blend_tiles, cut_tiles, plan_tiles, upscale

__all__ = [
    "ConditioningError",
    "InputImage",
    "InputLimits",
    "KeptDifference",
    "OutpaintCanvas",
    "OutpaintTarget",
    "TilePlan",
    "blend_tiles",
    "cut_tiles",
    "kept_region_difference",
    "load_input_image",
    "mask_from_alpha",
    "mask_from_image",
    "model_mask",
    "outpaint_canvas",
    "parse_target",
    "paste_back",
    "plan_tiles",
    "render_size_for_ratio",
    "seam_score",
    "upscale",
]
