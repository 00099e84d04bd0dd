"""SDXL's attention calls alone, per kernel: which one compute.attention should name on this card.

    python -m benchmarks.attention                   # on a CUDA machine: SDXL at 1024², batch 8 (~30 s)
    python -m benchmarks.attention --config tiny --size 64 --latents 4 --device cpu --kernels auto,flash,math

The shapes are the UNet's scaled-dot-product attention calls in one step (`benchmarks.flops.
attention_shapes`: at 1024² with 16 latents, 10 self-attentions over 4096 tokens and 60 over 1024,
each with a cross-attention over the 77 text tokens). Each shape is timed under each choice of
app.attention (the choice first, the kernels after it as fallbacks), in the pipeline's dtype, and
the step line sums each column over the step's calls. A kernel that cannot take a shape falls
back as it would in the generator; a choice this device lacks altogether gets "-".
`gpu_bench --attention-shapes` prints the same table first.
"""

from __future__ import annotations

import argparse
import functools

import torch

DEFAULT_KERNELS = ("auto", "cudnn", "flash", "efficient")  # math materialises the scores: slow, large


def call_flops(b: int, h: int, lq: int, lk: int, d: int) -> int:
    """Two matmuls: scores (lq x d by d x lk) and their product with the values (lq x lk by lk x d)."""
    return 4 * b * h * lq * lk * d


def measure(shapes: dict, device: torch.device, dtype: torch.dtype, kernels=DEFAULT_KERNELS, repeats: int = 10) -> dict:
    """{"kernels": [...], "shapes": [{shape, calls, seconds: {kernel: s or None}}],
    "step": {kernel: seconds per UNet step, or None}, "unsupported": {kernel: reason}}."""
    from app.attention import attention_kernels, attention_unsupported_reason
    from benchmarks.gemms import time_call

    unsupported = {k: why for k in kernels if (why := attention_unsupported_reason(k, device, dtype))}
    rows = []
    for shape, calls in sorted(shapes.items(), key=lambda item: -call_flops(*item[0])):
        b, h, lq, lk, d = shape
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(b, h, lq, d, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(b, h, lk, d, device=device, dtype=dtype, generator=g) for _ in range(2))
        seconds = {}
        for kernel in kernels:
            if kernel in unsupported:
                seconds[kernel] = None
                continue
            with attention_kernels(kernel):
                call = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v)
                seconds[kernel] = time_call(call, device, repeats)
        rows.append({"shape": list(shape), "calls": calls, "seconds": seconds})
        del q, k, v
    step = {}
    for kernel in kernels:
        times = [r["seconds"][kernel] for r in rows]
        step[kernel] = None if any(t is None for t in times) else sum(t * r["calls"] for t, r in zip(times, rows))
    return {"kernels": list(kernels), "shapes": rows, "step": step, "unsupported": unsupported}


def table(result: dict) -> str:
    """Markdown: TFLOP/s per shape and kernel, then the milliseconds per UNet step."""
    kernels = result["kernels"]
    lines = [
        "| batch x heads x query x key x channels | calls per step | " + " | ".join(kernels) + " (TFLOP/s) |",
        "|---|---|" + "---|" * len(kernels),
    ]
    for r in result["shapes"]:
        flops = call_flops(*r["shape"])
        rates = [f"{flops / s / 1e12:.4g}" if s else "-" for s in (r["seconds"][k] for k in kernels)]
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {r['calls']} | " + " | ".join(rates) + " |")
    step = [f"{s * 1e3:.1f} ms" if s is not None else "-" for s in (result["step"][k] for k in kernels)]
    lines.append("| one UNet step | | " + " | ".join(step) + " |")
    lines += [f"\n{k}: {why}" for k, why in result["unsupported"].items()]
    return "\n".join(lines)


def kernel_list(text: str) -> tuple[str, ...]:
    from app.attention import CHOICES

    kernels = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kernels if k not in CHOICES]
    if bad or not kernels:
        raise argparse.ArgumentTypeError(f"kernels {', '.join(bad) or '(none)'}: each one of {', '.join(CHOICES)}")
    return kernels


def main(argv: list[str] | None = None) -> int:
    from benchmarks.flops import attention_shapes
    from benchmarks.gemms import step_parser

    p = step_parser(__doc__.split("\n\n")[0])
    p.add_argument("--kernels", type=kernel_list, default=DEFAULT_KERNELS)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = measure(attention_shapes(a.config, a.size, a.latents), device, dtype, a.kernels, a.repeats)
    print(f"{a.config}, {a.size}x{a.size}, {a.latents} latents per step, {dtype}, torch {torch.__version__}")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
