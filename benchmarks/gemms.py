"""SDXL's FP8-able matmuls alone: bf16 against the FP8 variants, per shape and per UNet step.

    python -m benchmarks.gemms                    # on a CUDA machine: SDXL at 1024², batch 8 (~20 s)
    python -m benchmarks.gemms --config tiny --size 64 --latents 4 --device cpu

The shapes are the ones compute.fp8 converts, as a generator with fused QKV runs them in one UNet
step (`benchmarks.flops.linear_shapes`: 16 latents for 8 images with guidance). Each shape is
timed, inputs already quantised, as:

    high precision        x @ w.t() in the pipeline's dtype: bf16 (float32 on a CPU)
    fp8 row fast          torch._scaled_mm, row-wise scales, fast accumulation (compute.fp8's default)
    fp8 row               the same with fp32 promotion (compute.fp8_fast_accum: false)
    fp8 tensor fast       one scale per tensor (cuBLAS on CUDA), fast accumulation
    quantise              the eager row-wise quantisation of x, the pass inductor should fuse away

and the step line sums each column over the step's calls: the FP8 Linear layers' time per step,
which with the step's measured total says how much of the UNet FP8 can take off. `gpu_bench
--gemms` prints the same table first.
"""

from __future__ import annotations

import argparse
import time

import torch

VARIANTS = ("high precision", "fp8 row fast", "fp8 row", "fp8 tensor fast", "quantise")


def time_call(fn, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Seconds per call: the mean of `repeats` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def shape_seconds(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict:
    """Seconds per call of each variant at one (M, K, N); a variant this torch cannot run: None."""
    from app.fp8 import quantize_rows

    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    ws = ws.t().contiguous()
    # One scale per tensor: quantize_rows over the tensor as a single row.
    (xt, xt_scale), (wt, wt_scale) = (quantize_rows(t.reshape(1, -1)) for t in (x, w))
    xt, wt, xt_scale, wt_scale = xt.view(m, k), wt.view(n, k), xt_scale.reshape(()), wt_scale.reshape(())
    calls = {
        "high precision": lambda: torch.mm(x, w.t()),
        "fp8 row fast": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=dtype, use_fast_accum=True
        ),
        "fp8 row": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=dtype),
        "fp8 tensor fast": lambda: torch._scaled_mm(
            xt, wt.t(), scale_a=xt_scale, scale_b=wt_scale, out_dtype=dtype, use_fast_accum=True
        ),
        "quantise": lambda: quantize_rows(x),
    }
    seconds = {}
    for name, call in calls.items():
        try:
            seconds[name] = time_call(call, device, repeats)
        except (RuntimeError, NotImplementedError):  # e.g. row-wise scales on torch 2.11's CPU kernel
            seconds[name] = None
    return seconds


def measure(shapes: dict, device: torch.device, dtype: torch.dtype, repeats: int = 10) -> dict:
    """{"shapes": [{m, k, n, calls, seconds: {variant: s}}], "step": {variant: seconds per UNet step}}."""
    rows = []
    for (m, k, n), calls in sorted(shapes.items()):
        rows.append({"m": m, "k": k, "n": n, "calls": calls, "seconds": shape_seconds(m, k, n, device, dtype, repeats)})
    step = {}
    for v in VARIANTS:
        times = [r["seconds"][v] for r in rows]
        step[v] = None if any(t is None for t in times) else sum(t * r["calls"] for t, r in zip(times, rows))
    return {"shapes": rows, "step": step}


def table(result: dict) -> str:
    """Markdown: TFLOP/s per shape and variant (the quantisation as ms), then the seconds per step."""
    head = "| M x K x N | calls per step | " + " | ".join(VARIANTS[:-1]) + " (TFLOP/s) | quantise ms |"
    lines = [head, "|---|---|" + "---|" * len(VARIANTS)]
    for r in result["shapes"]:
        flops = 2 * r["m"] * r["k"] * r["n"]
        rates = [f"{flops / s / 1e12:.4g}" if s else "-" for s in (r["seconds"][v] for v in VARIANTS[:-1])]
        quant = r["seconds"]["quantise"]
        quant_cell = f"{quant * 1e3:.3f}" if quant is not None else "-"
        lines.append(f"| {r['m']} x {r['k']} x {r['n']} | {r['calls']} | " + " | ".join(rates) + f" | {quant_cell} |")
    step = [f"{s * 1e3:.1f} ms" if s is not None else "-" for s in (result["step"][v] for v in VARIANTS)]
    lines.append("| one UNet step | | " + " | ".join(step) + " |")
    return "\n".join(lines)


def step_parser(description: str) -> argparse.ArgumentParser:
    """The options of a timing of one UNet step's calls alone (this module, benchmarks.attention)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--latents", type=int, default=16, help="latents per UNet call (images x 2 with guidance)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks.flops import linear_shapes

    a = step_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = measure(linear_shapes(a.config, a.size, a.latents), device, dtype, a.repeats)
    print(f"{a.config}, {a.size}x{a.size}, {a.latents} latents per step, {dtype}, torch {torch.__version__}")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
