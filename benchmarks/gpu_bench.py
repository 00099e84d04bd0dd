"""Generator speed: imagefab's Generator next to stock diffusers, same process, same card.

    python -m benchmarks.gpu_bench                       # SDXL-base architecture, CUDA, 1024², 30 steps
    python -m benchmarks.gpu_bench --config tiny --device cpu --size 64 --steps 2 --batches 1,2

The SDXL-base architecture is built from the configs in benchmarks/sdxl/ with random bf16 weights:
the same arithmetic as the released weights, no download. A random rank-`--lora-rank` LoRA on
the attention projections is active in both (stock: loaded and set the usual way; imagefab: its
combination setting `fuse_loras`). Needs torch, transformers, diffusers, pydantic, pyyaml (the
GPU machine lacks diffusers and pydantic: carry their wheels, see benchmarks/RESULTS.md).

Prints a Markdown table: s/image and images/s per batch size, TFLOP/s (counted with torch's
FlopCounterMode on this very pipeline), warm-up/compile seconds, peak memory, the ratio to stock
at the same batch size, and the largest pixel difference between the two (0..255).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    impl: str
    batch: int
    seconds_per_image: float
    warmup_seconds: float
    peak_gib: float
    tflops: float
    max_pixel_diff: int | None = None
    ratio: float | None = None

    def cells(self) -> list[str]:
        return [self.impl, str(self.batch), f"{self.seconds_per_image:.3f}", f"{1 / self.seconds_per_image:.2f}",
                f"{self.tflops:.3g}", f"{self.warmup_seconds:.1f}", f"{self.peak_gib:.1f}",
                "-" if self.ratio is None else f"{self.ratio:.2f}x",
                "-" if self.max_pixel_diff is None else str(self.max_pixel_diff)]


def byte_tokenizer():
    """A CLIP tokenizer over the 256 byte symbols only: prompts pad to 77 tokens either way, so the
    text encoders do the same arithmetic as with the real vocabulary (which needs open_clip)."""
    from transformers import CLIPTokenizer

    from app.models.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def build_pipeline(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusionXLPipeline of the chosen architecture with random weights, on `device`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from app.models import tiny

    if config == "sdxl":
        unet_cfg = {k: v for k, v in json.loads((HERE / "sdxl" / "unet.json").read_text()).items() if not k.startswith("_")}
        vae_cfg = {k: v for k, v in json.loads((HERE / "sdxl" / "vae.json").read_text()).items() if not k.startswith("_")}
        te1 = CLIPTextConfig(**{k: v for k, v in json.loads((HERE / "sdxl" / "text_encoder.json").read_text()).items()
                                if k != "architectures"})
        te2 = CLIPTextConfig(**{k: v for k, v in json.loads((HERE / "sdxl" / "text_encoder_2.json").read_text()).items()
                                if k != "architectures"})
    else:
        unet_cfg, vae_cfg = dict(tiny.TINY_UNET), dict(tiny.TINY_VAE)
        ids = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        te1, te2 = CLIPTextConfig(**ids, **tiny.TINY_TEXT), CLIPTextConfig(**ids, **tiny.TINY_TEXT_2)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, for 2.6B weights
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        text_encoder = CLIPTextModel(te1).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(te2).to(dtype)
    tok = byte_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**tiny.SDXL_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_lora(pipe, folder: Path, rank: int, seed: int = 1) -> Path:
    """A random LoRA for this UNet in diffusers' file format (what a trained LoRA would be)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from app.models.tiny import LORA_TARGETS

    unet = pipe.unet
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(LORA_TARGETS)),
                     adapter_name="bench_tmp")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="bench_tmp"))
    layers = {k: (v * 0.01).to(torch.float32).cpu() for k, v in layers.items()}  # a mild, realistic delta
    unet.delete_adapters("bench_tmp")
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


def count_flops(run_once, steps: int) -> float:
    """FLOPs of one pipeline call of `steps` steps, from two counted calls (1 and 2 steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for n in (1, 2):
        with FlopCounterMode(display=False) as counter:
            run_once(n)
        totals.append(counter.get_total_flops())
    per_step, rest = totals[1] - totals[0], 2 * totals[0] - totals[1]
    return rest + per_step * steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batches", default="1,4,8", help="batch sizes, eager")
    p.add_argument("--compile-batches", default="", help="batch sizes for imagefab with torch.compile")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=16, help="0: no LoRA")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)

    from app.compute import ComputeSpec
    from app.generate import Generator
    from app.models.catalog import ResolvedModel
    from app.request import LoraUse, RenderRequest

    from app.models.loader import quiet_libraries

    quiet_libraries()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # both sides alike (the Generator pins CPU threads too)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = build_pipeline(args.config, device, dtype)
    print(f"built {args.config} on {device} in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in pipe.unet.parameters()) / 1e9:.2f} B UNet parameters)")
    tmp = Path(tempfile.mkdtemp(prefix="imagefab-bench-"))
    lora = None
    if args.lora_rank:
        path = save_random_lora(pipe, tmp / "lora", args.lora_rank)
        lora = ResolvedModel(name="bench-lora", kind="lora", version="1", source=str(path), path=str(path),
                             sha256="0" * 64, arch="bench", weight_name="pytorch_lora_weights.safetensors")
    prompts = [f"a studio photo of product {i}, white background" for i in range(64)]
    rows: list[Row] = []
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    # 1. Stock diffusers, eager, the LoRA loaded the usual way (unfused adapters).
    if lora:
        pipe.load_lora_weights(lora.path, weight_name=lora.weight_name, adapter_name="bench")
        pipe.set_adapters(["bench"], [0.8])

    def stock(batch: int, steps: int):
        return pipe(prompt=prompts[:batch], num_inference_steps=steps, guidance_scale=args.guidance,
                    height=args.size, width=args.size, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)]).images

    stock_images, stock_speed = {}, {}
    for b in [int(x) for x in args.batches.split(",") if x]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        w0 = time.perf_counter()
        stock_images[b] = stock(b, args.steps)
        warm = time.perf_counter() - w0
        seconds = timed(lambda: stock(b, args.steps), args.repeats, device)
        flops = count_flops(lambda n: stock(b, n), args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        stock_speed[b] = seconds / b
        rows.append(Row("diffusers eager", b, seconds / b, warm, peak, flops / seconds / 1e12))
    if lora:
        pipe.delete_adapters("bench")

    # 2. imagefab's Generator on the same weights: bf16, fused QKV, channels_last on CUDA, the
    #    LoRA fused into the weights (combination setting fuse_loras), batches as one call.
    base = ResolvedModel(name=f"{args.config}-random", kind="base", version="1", source="bench", path=str(tmp),
                         sha256="1" * 64, arch="bench")

    def requests(batch: int, steps: int) -> list[RenderRequest]:
        loras = (LoraUse("bench-lora", "1", 0.8, "0" * 64),) if lora else ()
        return [RenderRequest(image_id=f"{i:032x}", prompt=prompts[i], negative_prompt="", base_model=base.lineage(),
                              loras=loras, scheduler="euler", steps=steps, guidance=args.guidance, width=args.size,
                              height=args.size, seed=i, fuse_loras=bool(lora)) for i in range(batch)]

    def measure(gen: Generator, label: str, batches: list[int], warmup: float = 0.0):
        for b in batches:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            w0 = time.perf_counter()
            first = gen.render_batch_exactly(requests(b, args.steps))
            warm = warmup + time.perf_counter() - w0
            seconds = timed(lambda: gen.render_batch_exactly(requests(b, args.steps)), args.repeats, device)
            flops = count_flops(lambda n: gen.render_batch_exactly(requests(b, n)), args.steps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
            diff = None
            if b in stock_images:
                ours = np.stack([r.pixels for r in sorted(first, key=lambda r: r.image_id)]).astype(int)
                theirs = (np.clip(stock_images[b], 0, 1) * 255).round().astype(int)
                diff = int(np.abs(ours - theirs).max())
            ratio = stock_speed[b] / (seconds / b) if b in stock_speed else None
            rows.append(Row(label, b, seconds / b, warm, peak, flops / seconds / 1e12, diff, ratio))

    eager_batches = [int(x) for x in args.batches.split(",") if x]
    gen = Generator(base, {"bench-lora": lora} if lora else {}, ComputeSpec(device=device.type, batch_invariant=False,
                                                                           batch_size=max(eager_batches)), pipe=pipe)
    measure(gen, "imagefab eager", eager_batches)
    compiled = [int(x) for x in args.compile_batches.split(",") if x]
    if compiled:
        cgen = Generator(base, gen.loras, ComputeSpec(device=device.type, batch_invariant=False, compile=True,
                                                       batch_size=max(compiled)), pipe=pipe)
        measure(cgen, "imagefab compiled", compiled)

    header = ["implementation", "batch", "s/image", "images/s", "TFLOP/s", "warm-up s", "peak GiB",
              "vs stock", "max px diff"]
    print(f"\n{card}, {args.config}, {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, "
          f"{dtype}, LoRA rank {args.lora_rank}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r.cells()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
