"""Per-image list prices of hosted image APIs (USD, late 2026), the default when a spec sets none.

A self-hosted A1111 farm charges nothing per image: its cost is the farm's GPU time, which the
price table's `gpu_hourly` covers when the farm's hours are known.
"""

from __future__ import annotations

# Stability bills credits at $0.01 each: core 3, ultra 8, sd3.5-large 6.5, -large-turbo 4, -medium 3.5.
STABILITY_USD = {
    "core": 0.03,
    "ultra": 0.08,
    "sd3": 0.065,
    "sd3.5-large": 0.065,
    "sd3.5-large-turbo": 0.04,
    "sd3.5-medium": 0.035,
}
# The edit and upscale endpoints image-conditioned requests use (credits: inpaint 3, outpaint 4,
# conservative upscale 25); img2img goes to the generate endpoint at its engine's price.
STABILITY_EDIT_USD = {"inpaint": 0.03, "outpaint": 0.04, "upscale": 0.25}
OPENAI_USD = {"dall-e-2": 0.02, "dall-e-3": 0.04, "gpt-image-1": 0.042}
OPENAI_DEFAULT_USD = 0.04  # a compatible server whose model is not listed


def api_price_usd(backend: str, model: str | None, price_usd_per_image: float | None = None) -> float:
    """What one image costs at `backend` with `model`; a spec's own price wins."""
    if price_usd_per_image is not None:
        return price_usd_per_image
    if backend == "stability":
        return STABILITY_USD.get(model or "core", STABILITY_USD["core"])
    if backend == "openai":
        return OPENAI_USD.get(model or "", OPENAI_DEFAULT_USD)
    return 0.0
