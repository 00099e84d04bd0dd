"""The GPU stage: holds an SDXL pipeline with a LoRA adapter cache and renders RenderRequests.

`Generator.render(requests)` is the core used by the bulk job, the Serve app and `imagefab
regenerate`; `Generator.__call__(batch)` wraps it for Ray Data batches. Imports no Ray, MLflow or
DuckDB, so it also runs alone on a GPU machine for benchmarks.

Reproducibility: each image has its own CPU `torch.Generator` seeded from its request, so its
initial noise does not depend on the device or its batch mates. With `batch_invariant` (the
default) each image is also denoised in a batch of its own, so its pixels never depend on which
rows Ray happened to batch together; CPU generators fix their torch thread count for the same
reason (reductions split differently across threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import torch

from app.accelerator import AcceleratorSettings
from app.attention import attention_kernels, attention_unsupported_reason, cache_folder
from app.columns import object_column
from app.compute import ComputeSpec
from app.models.catalog import ResolvedModel, default_home
from app.models.digest import ModelFileError
from app.models.loader import LoraStackSwitcher, load_pipeline, make_scheduler, pick_device, pick_dtype
from app.request import RenderRequest, requests_from_batch


@dataclass
class RenderResult:
    image_id: str
    pixels: np.ndarray | None  # [H, W, 3] uint8, None when failed
    error: str = ""
    nonfinite_fraction: float = 0.0  # share of output values that were NaN/inf (replaced by 0)
    gpu_seconds: float = 0.0  # seconds of the generator's device, a batch's time shared by its images
    batch_id: str = ""
    batch_size: int = 1


@dataclass
class _InFlight:
    """A batch whose denoising is queued and whose decode may still be running (its own stream)."""

    chunk: list[RenderRequest]
    batch_id: str = ""
    started: float = 0.0
    pixels: torch.Tensor | None = None  # [B, H, W, 3] uint8 on the host (pinned: written by a copy in flight)
    bad: torch.Tensor | None = None  # [B] share of non-finite values, on the host
    done: object = None  # a torch.cuda.Event recorded after the copies; None: already on the host
    failed: list[RenderResult] = field(default_factory=list)  # the chunk failed before anything was queued


def _group_key(r: RenderRequest) -> tuple:
    # One pipeline call needs one LoRA stack (fused or not), scheduler, step count, guidance and
    # size, and either no negative prompts or all (see _start).
    return (r.combination_key, r.scheduler, r.steps, r.guidance, r.width, r.height, not r.negative_prompt)


class Generator:
    """Renders requests for one base model; LoRA stacks are switched per group of requests."""

    reads = ("image_id", "status", "request")
    adds = (
        "pixels",
        "nonfinite",
        "gpu_seconds",
        "accelerator",
        "accelerator_settings",
        "batch_id",
        "batch_size",
        "generator_id",
        "lora_switches",
        "lora_switch_seconds",
    )

    def __init__(self, base: ResolvedModel, loras: dict[str, ResolvedModel], compute: ComputeSpec, pipe=None):
        """`pipe`: an SDXL pipeline already built (benchmarks); else `base` is loaded from its files."""
        self.base = base
        self.loras = loras
        self.compute = compute
        self.device = pick_device(compute.device)
        if self.device.type == "cpu":
            torch.set_num_threads(compute.cpu_threads)
        self.dtype = pick_dtype(base.dtype, self.device)
        t0 = time.perf_counter()
        self.pipe = pipe if pipe is not None else load_pipeline(base, self.device, self.dtype)
        self.load_seconds = time.perf_counter() - t0
        self._scheduler_config = self.pipe.scheduler.config
        on_gpu = self.device.type == "cuda"
        self.fuse_qkv = on_gpu if compute.fuse_qkv is None else compute.fuse_qkv
        self.channels_last = on_gpu if compute.channels_last is None else compute.channels_last
        self.switcher = LoraStackSwitcher(fuse_qkv=self.fuse_qkv, unet_adapters=not compute.compile)
        self.fp8_error, self.fp8_layers = None, 0  # relative UNet output change, layers in FP8
        self.batch_limit = compute.batch_size  # lowered for good when a batch runs out of memory
        # Compiled graphs have fixed batch shapes: a short batch is padded up to `batch_size` (the
        # padding's images are dropped) instead of compiling its size (minutes on a GPU).
        self.batch_bucket = compute.batch_size if compute.compile and not compute.batch_invariant else 0
        why = attention_unsupported_reason(compute.attention, self.device, self.dtype)
        if why:
            raise RuntimeError(f'compute.attention={compute.attention}: {why} ("auto" lets torch choose)')
        self.compile_cache = use_compile_cache(compute.compile_cache, compute.attention) if compute.compile else None
        # Batch k decodes (and its pixels cross to the host) on a second stream while batch k+1
        # denoises; on the CPU only the collecting is deferred (same code path, nothing overlaps).
        self.overlap_decode = compute.overlaps_decode(on_gpu)
        self.decode_stream = torch.cuda.Stream(self.device) if on_gpu and self.overlap_decode else None
        self._last_done = 0.0  # when the last batch's pixels reached the host (shares device time out)
        self._optimise()
        self.accelerator_settings = self._describe_device()
        self.generator_id = uuid.uuid4().hex[:12]
        self.warmup_seconds = self._warm_up()

    def _optimise(self) -> None:
        """Speed settings that keep the arithmetic: memory layout, fused projections, compilation."""
        if self.channels_last:
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        if self.fuse_qkv:
            self.pipe.fuse_qkv_projections()
        if self.compute.fp8:
            self.fp8_error = self._quantize_fp8()
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            # Inference only; peft also turns requires_grad off when it loads a LoRA, which a
            # compiled graph's guards would see as a change (measured: one recompile).
            module = getattr(self.pipe, part, None)
            if module is not None:
                module.requires_grad_(False)
        if self.compute.compile:
            # Parameters stay graph inputs (no freezing), so fusing a LoRA into the weights in
            # place does not recompile; a new batch shape does (hence shape buckets + warm-up).
            # In place (nn.Module.compile): pipe.unet stays a UNet2DConditionModel, so LoRA loading
            # finds its adapters (a torch.compile wrapper there made `set_adapters` fail).
            # dynamic=False: each size gets its own static graph (a second size would otherwise
            # turn the first graph dynamic, with slower kernels for every size).
            self.pipe.unet.compile(mode=self.compute.compile_mode, dynamic=False)
            self.pipe.vae.decode = torch.compile(self.pipe.vae.decode, mode=self.compute.compile_mode, dynamic=False)

    def _quantize_fp8(self) -> float:
        """FP8 for the UNet's transformer Linear layers, if its output stays within the limit."""
        from app.fp8 import fp8_unsupported_reason, quantize_linears, refresh_all, relative_error

        why = fp8_unsupported_reason(self.device, self.dtype)
        if why:
            raise RuntimeError(f"compute.fp8: {why} (fp8: false renders in {self.dtype})")
        unet = self.pipe.unet
        inputs = _probe_inputs(unet.config, self.device, self.dtype)
        with torch.inference_mode(), attention_kernels(self.compute.attention):
            reference = unet(**inputs).sample
        fast_accum = self.compute.fp8_fast_accum
        with torch.no_grad():  # not inference mode: the FP8 buffers are rewritten in place later
            report = quantize_linears(unet, fast_accum=fast_accum)
        with torch.inference_mode(), attention_kernels(self.compute.attention):
            error = relative_error(reference, unet(**inputs).sample)
        if error > self.compute.fp8_max_error:
            raise RuntimeError(
                f"compute.fp8: FP8 moves {self.base.name}'s UNet output by {error:.3f} (relative), above "
                f"compute.fp8_max_error {self.compute.fp8_max_error}: render it in {self.dtype} (fp8: false)"
            )
        # Fused stacks rewrite weights in place and re-fusing QKV builds new layers: re-quantise.
        self.switcher.after_change = lambda pipe: (
            quantize_linears(pipe.unet, fast_accum=fast_accum),
            refresh_all(pipe.unet),
        )
        self.fp8_layers = report.layers
        return error

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def _warm_up(self) -> float:
        """Compile the listed sizes now, at actor start, instead of in the first real batch."""
        if not (self.compute.compile and self.compute.warmup_sizes):
            return 0.0
        t0 = time.perf_counter()
        batch = 1 if self.compute.batch_invariant else self.compute.batch_size
        # Two batches when decodes overlap: the memory of a decode beside the next denoising is
        # found short now (overlap off, or batch_limit halved), not in the first real batches.
        batches = 2 if self.overlap_decode else 1
        for size in self.compute.warmup_sizes:
            width, _, height = size.lower().partition("x")
            reqs = [
                RenderRequest(
                    image_id=f"warmup{i}",
                    prompt="warm-up",
                    negative_prompt="",
                    base_model=self.base.lineage(),
                    loras=(),
                    scheduler="euler",
                    steps=2,
                    guidance=5.0,
                    width=int(width),
                    height=int(height),
                    seed=i,
                )
                for i in range(batch * batches)
            ]
            _, last = self._render_chunks(_chunks(reqs, batch), None, exact=False)
            self._collect(last)
        return time.perf_counter() - t0

    def _describe_device(self) -> AcceleratorSettings:
        """The device and every setting that can change an image's last bits (see regenerate)."""
        c = self.compute
        on_cuda = self.device.type == "cuda"
        return AcceleratorSettings(
            device="cuda" if on_cuda else "cpu",
            device_name=self._device_name() if on_cuda else "",
            threads=0 if on_cuda else torch.get_num_threads(),
            dtype=str(self.dtype).removeprefix("torch."),
            fused_qkv=self.fuse_qkv,
            channels_last=self.channels_last,
            compiled=c.compile,
            compile_mode=c.compile_mode,
            fp8=c.fp8,
            fp8_fast_accum=c.fp8_fast_accum,
            attention=c.attention,
            batch_bucket=self.batch_bucket,
            vae_tiling_above=c.vae_tiling_above,
        )

    @property
    def accelerator(self) -> str:
        """`accelerator_settings` in words (the catalog's `accelerator`)."""
        return self.accelerator_settings.label()

    # --- Ray Data entry -------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        pending = [i for i in range(n) if batch["status"][i] == "pending"]
        results = {r.image_id: r for r in self.render(requests_from_batch(batch, pending))}
        pixels, nonfinite, gpu_s, batch_ids, sizes = [], [], [], [], []
        status, error = list(batch["status"]), list(batch["error"])
        for i in range(n):
            r = results.get(batch["image_id"][i])
            if r is not None and r.error:
                status[i], error[i] = "failed", r.error
            pixels.append(b"" if r is None or r.pixels is None else r.pixels.tobytes())
            nonfinite.append(0.0 if r is None else r.nonfinite_fraction)
            gpu_s.append(0.0 if r is None else r.gpu_seconds)
            batch_ids.append("" if r is None else r.batch_id)
            sizes.append(0 if r is None else r.batch_size)
        return {
            **batch,
            "status": np.array(status, dtype=object),
            "error": np.array(error, dtype=object),
            "pixels": np.array(pixels, dtype=object),
            "nonfinite": np.array(nonfinite, dtype=np.float64),
            "gpu_seconds": np.array(gpu_s, dtype=np.float64),
            "accelerator": np.array([self.accelerator] * n, dtype=object),
            "accelerator_settings": object_column([self.accelerator_settings.to_value()] * n),
            "batch_id": np.array(batch_ids, dtype=object),
            "batch_size": np.array(sizes, dtype=np.int32),
            # Cumulative per actor, so the driver can report switches per generator.
            "generator_id": np.array([self.generator_id] * n, dtype=object),
            "lora_switches": np.full(n, self.switcher.switches, dtype=np.int64),
            "lora_switch_seconds": np.full(n, self.switcher.switch_seconds, dtype=np.float64),
        }

    # --- core -----------------------------------------------------------------------------------
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        """Render requests, grouped so that one group is one LoRA stack and one pipeline setting."""
        results: list[RenderResult] = []
        inflight = None  # the last batch's decode may run on while the next group's stack is set
        ordered = sorted(requests, key=_group_key)
        for _, group in groupby(ordered, key=_group_key):
            group = list(group)
            try:
                self._prepare(group[0])
            except (ModelFileError, KeyError) as e:
                results += [RenderResult(r.image_id, None, error=f"model_error: {e}") for r in group]
                continue
            if self.compute.batch_invariant:
                chunks = [[r] for r in group]
            else:
                # Batches ordered by image_id, so `regenerate` can rebuild one from its members alone.
                chunks = _chunks(sorted(group, key=lambda r: r.image_id), self.batch_limit)
            done, inflight = self._render_chunks(chunks, inflight, exact=False)
            results += done
        return results + self._collect(inflight)

    def render_batch_exactly(self, requests: list[RenderRequest]) -> list[RenderResult]:
        """Render `requests` as one pipeline call, as a recorded batch was (see `render`)."""
        return self.render_batches([requests])

    def render_batches(self, batches: list[list[RenderRequest]]) -> list[RenderResult]:
        """Render each list as one pipeline call, back to back (each decode beside the next
        batch's denoising); a batch that runs out of memory fails rather than being split."""
        results: list[RenderResult] = []
        inflight = None
        for batch in batches:
            ordered = sorted(batch, key=lambda r: r.image_id)
            self._prepare(ordered[0])
            done, inflight = self._render_chunks([ordered], inflight, exact=True)
            results += done
        return results + self._collect(inflight)

    def _render_chunks(
        self, chunks: list[list[RenderRequest]], inflight: _InFlight | None, exact: bool
    ) -> tuple[list[RenderResult], _InFlight | None]:
        """Start each chunk, collecting the one before it once the next is queued; returns the
        results so far and the chunk still in flight.

        Out of memory while another batch is still decoding: that batch is finished and freed,
        decodes stop overlapping for the generator's life, and the chunk is tried again. Out of
        memory alone: the batch size halves for good (unless `exact`: a recorded batch fails).
        """
        results: list[RenderResult] = []
        queue = list(chunks)
        while queue:
            chunk = queue.pop(0)
            try:
                started = self._start(chunk, raise_oom=inflight is not None or (len(chunk) > 1 and not exact))
            except torch.OutOfMemoryError:
                if inflight is not None:
                    results += self._collect(inflight)
                    inflight = None
                    self.overlap_decode = False
                    queue.insert(0, chunk)
                else:
                    self.batch_limit = max(1, len(chunk) // 2)
                    if self.batch_bucket:
                        self.batch_bucket = self.batch_limit  # a new compiled shape, once
                    self.accelerator_settings = self._describe_device()
                    queue = _chunks([r for c in [chunk, *queue] for r in c], self.batch_limit)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results += self._collect(inflight)
            inflight = started
            if not self.overlap_decode:
                results += self._collect(inflight)
                inflight = None
        return results, inflight

    def _prepare(self, first: RenderRequest) -> None:
        if first.base_model["sha256"] != self.base.sha256:
            raise ModelFileError(
                f"request wants base '{first.base_model['name']}' ({first.base_model['sha256'][:12]}), "
                f"this generator holds '{self.base.name}' ({self.base.sha256[:12]})"
            )
        stack = []
        for use in first.loras:
            lo = self.loras.get(use.name)
            if lo is None or lo.sha256 != use.sha256:
                raise ModelFileError(f"LoRA '{use.name}' ({use.sha256[:12]}) is not loaded on this generator")
            stack.append((lo, use.weight))
        self.switcher.apply(self.pipe, stack, fuse=first.fuse_loras)
        self.pipe.scheduler = make_scheduler(first.scheduler, self._scheduler_config)

    def _start(self, chunk: list[RenderRequest], raise_oom: bool) -> _InFlight:
        """Denoise a chunk, then queue its decode and the copy of its pixels to the host: on the
        decode stream when there is one, so that the next chunk's denoising need not wait."""
        r0 = chunk[0]
        batch_id = (
            chunk[0].image_id
            if len(chunk) == 1
            else hashlib.sha256("".join(r.image_id for r in chunk).encode()).hexdigest()[:32]
        )
        padded = chunk + [chunk[-1]] * (self.batch_bucket - len(chunk))
        # VAE tiling only for images above the threshold: tiles blend at their seams, so it is a
        # function of the size alone (regenerate decodes the same way).
        if r0.width * r0.height > self.compute.vae_tiling_above:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        t0 = time.perf_counter()
        stream = self.decode_stream if self.overlap_decode else None
        try:
            # The attention choice is in force for the denoising and the decode, and so for any
            # compiling they trigger (a compiled graph keeps the kernel it was traced with).
            with torch.inference_mode(), attention_kernels(self.compute.attention):
                latents = self.pipe(
                    prompt=[r.prompt for r in padded],
                    # No negative prompt: SDXL's zeroed negative embedding (as stock diffusers and
                    # A1111 do), not an encoded empty string, which renders differently.
                    negative_prompt=None if not r0.negative_prompt else [r.negative_prompt for r in padded],
                    num_inference_steps=r0.steps,
                    guidance_scale=r0.guidance,
                    width=r0.width,
                    height=r0.height,
                    # CPU generators: the same noise on any device.
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in padded],
                    output_type="latent",
                ).images
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    # The caching allocator must not give the latents' memory to the next batch
                    # before this stream has read them.
                    latents.record_stream(stream)
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    # The padded batch decodes whole: one compiled decoder shape per size.
                    pixels, bad = uint8_on_device(self._decode(latents)[: len(chunk)])
                    if stream is None:
                        return _InFlight(chunk, batch_id, t0, pixels.cpu(), bad.cpu())
                    host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
                    host_bad = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
                    host_pixels.copy_(pixels, non_blocking=True)
                    host_bad.copy_(bad, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(stream)
                    return _InFlight(chunk, batch_id, t0, host_pixels, host_bad, done)
        except torch.OutOfMemoryError:
            if raise_oom:
                raise
            what = "one image" if len(chunk) == 1 else f"a recorded batch of {len(chunk)}"
            return _InFlight(
                chunk,
                failed=[
                    RenderResult(
                        r.image_id,
                        None,
                        error=f"generate_error: out of memory at {r0.width}x{r0.height} for {what} "
                        f"(compute.vae_tiling_above decodes large images in tiles)",
                    )
                    for r in chunk
                ],
            )
        except Exception as e:  # a kernel error: these rows fail, the actor lives on
            return _InFlight(
                chunk,
                failed=[
                    RenderResult(r.image_id, None, error=f"generate_error: {type(e).__name__}: {e}") for r in chunk
                ],
            )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> [B, 3, H, W] in [0, 1], as the SDXL pipeline's own `output_type="pt"` does."""
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # float16 overflows in SDXL's VAE
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(self.pipe, "watermark", None) is not None:
            image = self.pipe.watermark.apply_watermark(image)
        return self.pipe.image_processor.postprocess(image, output_type="pt")

    def _collect(self, inflight: _InFlight | None) -> list[RenderResult]:
        """Wait for a started chunk's pixels; its device time is the wall time since the chunk
        before it was collected (or since it started), so overlapping batches are not counted twice."""
        if inflight is None:
            return []
        if inflight.failed:
            return inflight.failed
        chunk = inflight.chunk
        try:
            if inflight.done is not None:
                inflight.done.synchronize()
        except Exception as e:  # a kernel error in the decode, reported when it is waited for
            return [RenderResult(r.image_id, None, error=f"generate_error: {type(e).__name__}: {e}") for r in chunk]
        now = time.perf_counter()
        per_image = (now - max(inflight.started, self._last_done)) / len(chunk)
        self._last_done = now
        pixels = inflight.pixels.numpy()
        if inflight.done is not None:
            pixels = pixels.copy()  # out of the pinned buffer, which goes back to the host allocator
        return [
            RenderResult(
                r.image_id,
                px,
                nonfinite_fraction=b,
                gpu_seconds=per_image,
                batch_id=inflight.batch_id,
                batch_size=len(chunk),
            )
            for r, px, b in zip(chunk, pixels, inflight.bad.tolist())
        ]

    def stats(self) -> dict:
        return {
            "accelerator": self.accelerator,
            "fp8_error": self.fp8_error,
            "load_seconds": self.load_seconds,
            "warmup_seconds": self.warmup_seconds,
            "lora_switches": self.switcher.switches,
            "lora_switch_seconds": self.switcher.switch_seconds,
        }


def uint8_on_device(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 and each image's share of non-finite
    values (replaced by 0), computed where the images are: on a GPU only a quarter of the float32
    bytes cross to the host, and the host's ~11 ms per 1024² image of numpy work goes away.
    Same arithmetic as the float32 numpy it replaces (float32 multiply, round half to even)."""
    x = images.float()
    finite = torch.isfinite(x)
    bad = 1.0 - finite.flatten(1).float().mean(dim=1)
    x = torch.where(finite, x, 0.0).clamp_(0.0, 1.0).mul_(255.0).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous(), bad


def _probe_inputs(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
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


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
