"""Where one SDXL image's arithmetic goes, by layer kind: counted, not timed.

    python -m benchmarks.flops                                   # SDXL-base, 1024², 30 steps, guidance on
    python -m benchmarks.flops --config tiny --size 64 --steps 2

The architecture is built from benchmarks/sdxl/ on torch's meta device (shapes only: no weights,
no GPU, ~10 s), one UNet step and one VAE decode run under FlopCounterMode, and each FLOP is put
in one kind:

    FP8 Linear     the Linear layers compute.fp8 converts (app.fp8.DEFAULT_INCLUDE)
    other Linear   time/class embeddings, resnets' time projections, transformers' proj_in/out
    conv 3x3, conv 1x1
    attention      what remains of the UNet's count: the two matmuls of each attention
    VAE decode     the whole decoder, once per image

A kind's seconds per image at a rate are its FLOPs divided by that rate: with `--rates` (TFLOP/s
per kind) the table adds that floor, the time the kernels alone would take at those rates, with
nothing for norms, element-wise work or launches. Used for the predictions in GPU-NOTES.md.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from benchmarks.pipelines import build_pipeline

KINDS = ("FP8 Linear", "other Linear", "conv 3x3", "conv 1x1", "attention", "VAE decode")


def image_flops(config: str = "sdxl", size: int = 1024, steps: int = 30, guidance: bool = True) -> dict[str, float]:
    """FLOPs of one `size`² image at `steps` steps, by kind (KINDS), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    latents = 2 if guidance else 1  # classifier-free guidance: the unconditional latent too
    pipe, linears, convs, step_total = trace_unet(config, size, latents)
    vae, side = pipe.vae, size // 8
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        vae.decode(torch.zeros(1, vae.config.latent_channels, side, side, device="meta", dtype=torch.bfloat16))
    flops = {"FP8 Linear": 0, "other Linear": 0}
    for (selected, m, k, n), calls in linears.items():
        flops["FP8 Linear" if selected else "other Linear"] += 2 * m * k * n * calls
    flops.update(convs)
    flops["attention"] = step_total - sum(flops.values())
    flops = {kind: flops.get(kind, 0) * steps for kind in KINDS[:5]}
    flops["VAE decode"] = decode.get_total_flops()
    return flops


def linear_shapes(config: str = "sdxl", size: int = 1024, latents: int = 16) -> Counter:
    """The matmuls compute.fp8 converts, as a generator with fused QKV runs them in one UNet step
    over `latents` latents (a batch of 8 images with guidance: 16): (M, K, N) -> calls."""
    _, linears, _, _ = trace_unet(config, size, latents, fuse_qkv=True)
    shapes: Counter = Counter()
    for (selected, m, k, n), calls in linears.items():
        if selected:
            shapes[m, k, n] += calls
    return shapes


def attention_shapes(config: str = "sdxl", size: int = 1024, latents: int = 16) -> Counter:
    """The UNet's scaled-dot-product attention calls in one step over `latents` latents, as
    (batch, heads, query tokens, key tokens, head channels) -> calls."""
    from torch.overrides import TorchFunctionMode

    shapes: Counter = Counter()

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k = args[0], args[1]
                shapes[(*q.shape[:3], k.shape[2], q.shape[3])] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        trace_unet(config, size, latents, fuse_qkv=True)
    return shapes


def trace_unet(config: str, size: int, latents: int, fuse_qkv: bool = False):
    """One UNet step on the meta device: the pipeline, its Linear calls as (converted by
    compute.fp8, M, K, N) -> calls, its convolution FLOPs by kind, and torch's FLOP count."""
    from torch.utils.flop_counter import FlopCounterMode

    from app.fp8 import DEFAULT_INCLUDE

    pipe = build_pipeline(config, torch.device("meta"), torch.bfloat16)
    unet = pipe.unet
    if fuse_qkv:
        unet.fuse_qkv_projections()
    linears: Counter = Counter()
    convs: Counter = Counter()
    selected = re.compile(DEFAULT_INCLUDE)
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(_linear_hook(linears, bool(selected.search(name)))))
        elif isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(_conv_hook(convs)))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as step:
            unet(**_unet_inputs(unet.config, latents, size // 8))
    finally:
        for h in hooks:
            h.remove()
    return pipe, linears, convs, step.get_total_flops()


def _unet_inputs(config, latents: int, side: int) -> dict:
    meta = {"device": "meta", "dtype": torch.bfloat16}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.zeros(latents, config.in_channels, side, side, **meta),
        "timestep": torch.zeros(latents, device="meta"),
        "encoder_hidden_states": torch.zeros(latents, 77, config.cross_attention_dim, **meta),
        "added_cond_kwargs": {
            "text_embeds": torch.zeros(latents, pooled, **meta),
            "time_ids": torch.zeros(latents, 6, **meta),
        },
    }


def _linear_hook(counter: Counter, selected: bool):
    def hook(module, args, out):
        counter[selected, args[0].numel() // module.in_features, module.in_features, module.out_features] += 1

    return hook


def _conv_hook(counter: Counter):
    def hook(module, args, out):
        kh, kw = module.kernel_size
        counter[f"conv {kh}x{kw}"] += 2 * out.numel() * (module.in_channels // module.groups) * kh * kw

    return hook


def parse_rates(text: str) -> dict[str, float]:
    """ "FP8 Linear=1000,conv 3x3=450" -> {kind: TFLOP/s}; kinds must be KINDS."""
    rates = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind.strip()!r} in --rates: one of {', '.join(KINDS)}")
        rates[kind.strip()] = float(value)
    return rates


def table(flops: dict[str, float], rates: dict[str, float]) -> str:
    total = sum(flops.values())
    lines = [
        "| kind | TFLOP per image | share |" + (" TFLOP/s | s per image |" if rates else ""),
        "|---|---|---|" + ("---|---|" if rates else ""),
    ]
    floor = 0.0
    for kind in KINDS:
        cells = [kind, f"{flops[kind] / 1e12:.4g}", f"{flops[kind] / total:.1%}"]
        if rates:
            rate = rates.get(kind)
            seconds = flops[kind] / (rate * 1e12) if rate else None
            floor += seconds or 0.0
            cells += [f"{rate:g}" if rate else "-", f"{seconds:.3f}" if seconds is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| total | {total / 1e12:.4g} | 100% |" + (f" | {floor:.3f} (kernels only) |" if rates else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-guidance", action="store_true", help="one latent per step instead of two")
    p.add_argument(
        "--rates",
        type=parse_rates,
        default={},
        help='TFLOP/s per kind for the kernels-only floor, e.g. "FP8 Linear=1000,attention=430"',
    )
    a = p.parse_args(argv)
    if a.size % 8 or a.size < 64:
        p.error(f"--size must be a multiple of 8 and at least 64, got {a.size}")
    flops = image_flops(a.config, a.size, a.steps, guidance=not a.no_guidance)
    print(f"{a.config}, {a.size}x{a.size}, {a.steps} steps, guidance {'off' if a.no_guidance else 'on'}")
    print(table(flops, a.rates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
