"""Setting up the SDXL pipeline a generator holds: the speed settings that keep its arithmetic.

Each is a `compute` setting recorded in the catalog's `accelerator` (it can change an image's last
bits) and applied again by `regenerate`:
- memory layout (`channels_last`) and fused QKV projections (`fuse_qkv`), on for CUDA by default;
- FP8 for the UNet's transformer Linear layers (`fp8`, app/fp8.py), refused at start when the
  UNet's output on fixed inputs moves more than `fp8_max_error`, re-quantised after each LoRA switch;
- torch.compile of the UNet and the VAE decoder (`compile`, `compile_mode`) with inductor's caches
  in a folder shared by every generator that points at it (`compile_cache`);
- the attention kernel (`attention`, app/attention.py), checked at start;
- warm-up: the sizes in `warmup_sizes` compiled at start rather than in the first real batch,
  by one generator at a time per set of graphs (`compiling_alone`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from app.attention import attention_kernels, attention_unsupported_reason, cache_folder
from app.compute import ComputeSpec
from app.generator.batching import chunks
from app.models.catalog import ResolvedModel, default_home
from app.models.loader import LoraStackSwitcher
from app.request import RenderRequest


def speed_setting(value: bool | None, device: torch.device) -> bool:
    """A speed setting as the spec gives it; None: on for CUDA, off for the CPU."""
    return device.type == "cuda" if value is None else value


def check_attention(choice: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse an attention kernel the device cannot run, with torch's reason."""
    why = attention_unsupported_reason(choice, device, dtype)
    if why:
        raise RuntimeError(f'compute.attention={choice}: {why} ("auto" lets torch choose)')


@dataclass(frozen=True)
class Fp8Check:
    error: float  # the UNet's output change on fixed inputs, relative
    layers: int  # Linear layers now in FP8


def optimise(
    pipe,
    compute: ComputeSpec,
    switcher: LoraStackSwitcher,
    *,
    fuse_qkv: bool,
    channels_last: bool,
    model_name: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Fp8Check | None:
    """Apply the speed settings that keep the arithmetic, in place: memory layout, fused
    projections, FP8 (of the fused projections), compilation last. Returns FP8's check, if on."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if fuse_qkv:
        pipe.fuse_qkv_projections()
    fp8 = None
    if compute.fp8:
        fp8 = quantize_fp8(pipe, compute, switcher, model_name=model_name, device=device, dtype=dtype)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        # Inference only; peft also turns requires_grad off when it loads a LoRA, which a
        # compiled graph's guards would see as a change (measured: one recompile).
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)
    if compute.compile:
        # Parameters stay graph inputs (no freezing), so fusing a LoRA into the weights in
        # place does not recompile; a new batch shape does (hence shape buckets + warm-up).
        # In place (nn.Module.compile): pipe.unet stays a UNet2DConditionModel, so LoRA loading
        # finds its adapters (a torch.compile wrapper there made `set_adapters` fail).
        # dynamic=False: each size gets its own static graph (a second size would otherwise
        # turn the first graph dynamic, with slower kernels for every size).
        pipe.unet.compile(mode=compute.compile_mode, dynamic=False)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compute.compile_mode, dynamic=False)
    return fp8


def quantize_fp8(
    pipe,
    compute: ComputeSpec,
    switcher: LoraStackSwitcher,
    *,
    model_name: str,
    device: torch.device,
    dtype: torch.dtype,
) -> Fp8Check:
    """FP8 for the UNet's transformer Linear layers, if its output stays within the limit."""
    from app.fp8 import fp8_unsupported_reason, quantize_linears, refresh_all, relative_error

    unet = pipe.unet
    why = fp8_unsupported_reason(device, dtype)
    if why:
        raise RuntimeError(f"compute.fp8: {why} (fp8: false renders in {dtype})")
    inputs = probe_inputs(unet.config, device, dtype)
    with torch.inference_mode(), attention_kernels(compute.attention):
        reference = unet(**inputs).sample
    fast_accum = compute.fp8_fast_accum
    with torch.no_grad():  # not inference mode: the FP8 buffers are rewritten in place later
        report = quantize_linears(unet, fast_accum=fast_accum)
    with torch.inference_mode(), attention_kernels(compute.attention):
        error = relative_error(reference, unet(**inputs).sample)
    if error > compute.fp8_max_error:
        raise RuntimeError(
            f"compute.fp8: FP8 moves {model_name}'s UNet output by {error:.3f} (relative), above "
            f"compute.fp8_max_error {compute.fp8_max_error}: render it in {dtype} (fp8: false)"
        )
    # Fused stacks rewrite weights in place and re-fusing QKV builds new layers: re-quantise.
    switcher.after_change = lambda pipe: (
        quantize_linears(pipe.unet, fast_accum=fast_accum),
        refresh_all(pipe.unet),
    )
    return Fp8Check(error=error, layers=report.layers)


def probe_inputs(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Fixed random UNet inputs (two latents of 32x32, SDXL's conditioning) for output checks."""
    g = torch.Generator("cpu").manual_seed(seed)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {
        "sample": rand(2, config.in_channels, 32, 32),
        "timestep": torch.tensor([500.0, 500.0], device=device),
        "encoder_hidden_states": rand(2, 77, config.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": rand(2, pooled),
            "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * 2, device=device, dtype=dtype),
        },
    }


def use_compile_cache(where: str | None, attention: str = "auto") -> str:
    """Point inductor's on-disk caches at one directory per torch build (and per attention
    choice other than "auto": its graphs are keyed without it, see app/attention.py); returns it.

    Every generator process that uses the same directory shares compiled graphs and autotuning
    results: the first to compile a shape writes it, the others (and restarted actors) load it.
    """
    folders = [f"torch-{torch.__version__}", cache_folder(attention)]
    path = os.path.join(where or str(default_home() / "compile-cache"), *filter(None, folders))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


@contextlib.contextmanager
def compiling_alone(cache: str, graphs: dict) -> Iterator[None]:
    """Hold the warm-up lock of one set of graphs (`graphs`: everything that shapes them) in the
    compile cache `cache`, for as long as the block runs.

    Generators that start together with the same settings (the actors of one node, a restarted
    replica beside a live one) would each compile the same graphs at once, on the same CPU cores,
    as inductor caches a graph only once it is compiled. Under this lock the first compiles and
    writes the cache, and the others wait and then load every graph from it: one compile's CPU
    time instead of one per generator. Different settings hold different locks and compile side
    by side. An OS file lock: a generator that dies holding it lets the next one go on; a cache on
    a filesystem without locks compiles side by side, as before.
    """
    key = hashlib.sha256(json.dumps(graphs, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = os.path.join(cache, "warm-up-locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{key}.lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except OSError:  # no locks here (some network filesystems): compile without waiting
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def architecture(config) -> dict:
    """A diffusers model config without its bookkeeping (`_name_or_path`, `_diffusers_version`, …)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def warmup_batches(compute: ComputeSpec, base: ResolvedModel, calls: int) -> list[list[list[RenderRequest]]]:
    """For each of `compute.warmup_sizes`, `calls` pipeline calls of the shape real batches have
    (two steps of a placeholder prompt: compiling is what takes the time)."""
    batch = 1 if compute.batch_invariant else compute.batch_size
    sizes = []
    for size in compute.warmup_sizes:
        width, _, height = size.lower().partition("x")
        reqs = [
            RenderRequest(
                image_id=f"warmup{i}",
                prompt="warm-up",
                negative_prompt="",
                base_model=base.lineage(),
                loras=(),
                scheduler="euler",
                steps=2,
                guidance=5.0,
                width=int(width),
                height=int(height),
                seed=i,
            )
            for i in range(batch * calls)
        ]
        sizes.append(chunks(reqs, batch))
    return sizes
