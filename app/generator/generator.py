"""The GPU stage: holds an SDXL pipeline with a LoRA adapter cache and renders RenderRequests.

`Generator.render(requests)` is the core used by the bulk job, the Serve app and `imagefab
regenerate`; `Generator.__call__(batch)` wraps it for Ray Data batches. It composes the pipeline's
set-up and speed settings (pipeline.py), batching and the out-of-memory policy (batching.py), the
decode beside the next batch (overlap.py) and diffusers' VAE decode (vae_decode.py).

Reproducibility: each image has its own CPU `torch.Generator` seeded from its request, so its
initial noise does not depend on the device or its batch mates. With `batch_invariant` (the
default) each image is also denoised in a batch of its own, so its pixels never depend on which
rows Ray happened to batch together; CPU generators fix their torch thread count for the same
reason (reductions split differently across threads).
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch

from app.accelerator import AcceleratorSettings
from app.attention import attention_kernels
from app.columns import object_column
from app.compute import ComputeSpec
from app.conditioning.errors import ConditioningError
from app.conditioning.measures import MEASURE_COLUMNS, Measures
from app.generator.batching import BatchSizes, batch_id, group_key, out_of_memory_error
from app.generator.conditioned import ConditionedRenderer
from app.generator.overlap import DecodeOverlap, InFlight
from app.generator.pipeline import (
    architecture,
    check_attention,
    compiling_alone,
    optimise,
    speed_setting,
    use_compile_cache,
    warmup_batches,
)
from app.generator.vae_decode import decode_latents
from app.models.catalog import ResolvedModel
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
    measures: Measures | None = None  # image-conditioned requests: kept-region and seam measures


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
        *MEASURE_COLUMNS,
    )

    def __init__(self, base: ResolvedModel, loras: dict[str, ResolvedModel], compute: ComputeSpec, pipe=None):
        """`pipe`: an SDXL pipeline already built (benchmarks); else `base` is loaded from its files."""
        self.base = base
        self.loras = loras
        self.compute = compute
        # 1. The device and its dtype; the attention kernel asked for must run there.
        self.device = pick_device(compute.device)
        if self.device.type == "cpu":
            torch.set_num_threads(compute.cpu_threads)
        self.dtype = pick_dtype(base.dtype, self.device)
        check_attention(compute.attention, self.device, self.dtype)
        # 2. The pipeline, loaded once.
        t0 = time.perf_counter()
        self.pipe = pipe if pipe is not None else load_pipeline(base, self.device, self.dtype)
        self.load_seconds = time.perf_counter() - t0
        self._scheduler_config = self.pipe.scheduler.config
        # 3. Speed settings, LoRA stacks, batching, decode overlap.
        self.fuse_qkv = speed_setting(compute.fuse_qkv, self.device)
        self.channels_last = speed_setting(compute.channels_last, self.device)
        self.switcher = LoraStackSwitcher(fuse_qkv=self.fuse_qkv, unet_adapters=not compute.compile)
        self.batch_sizes = BatchSizes.for_compute(compute)
        self.compile_cache = use_compile_cache(compute.compile_cache, compute.attention) if compute.compile else None
        self.overlap = DecodeOverlap(self.device, compute.overlaps_decode(self.device.type == "cuda"))
        self.conditioned = ConditionedRenderer(self.pipe)
        fp8 = optimise(
            self.pipe,
            compute,
            self.switcher,
            fuse_qkv=self.fuse_qkv,
            channels_last=self.channels_last,
            model_name=base.name,
            device=self.device,
            dtype=self.dtype,
        )
        self.fp8_error = fp8.error if fp8 else None  # relative UNet output change
        self.fp8_layers = fp8.layers if fp8 else 0  # Linear layers in FP8
        # 4. What the catalog records of it, then the compiled shapes warmed up.
        self.accelerator_settings = self._describe_device()
        self.generator_id = uuid.uuid4().hex[:12]
        self.warmup_seconds = self._warm_up()

    # The batching and overlap state, by the names the tests, benchmarks and `accelerator` use.
    @property
    def batch_limit(self) -> int:
        return self.batch_sizes.limit

    @property
    def batch_bucket(self) -> int:
        return self.batch_sizes.bucket

    @property
    def overlap_decode(self) -> bool:
        return self.overlap.on

    @property
    def decode_stream(self) -> torch.cuda.Stream | None:
        return self.overlap.stream

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

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

    def _warm_up(self) -> float:
        """Compile the listed sizes now, at actor start, instead of in the first real batch."""
        if not (self.compute.compile and self.compute.warmup_sizes):
            return 0.0
        t0 = time.perf_counter()
        # What shapes the graphs: the settings, the sizes and the architecture (not the weights,
        # which stay graph inputs: another base of the same architecture loads the same graphs).
        graphs = {
            "settings": self.accelerator_settings.to_value(),
            "sizes": list(self.compute.warmup_sizes),
            **{part: architecture(getattr(self.pipe, part).config) for part in ("unet", "vae")},
        }
        assert self.compile_cache is not None  # set whenever compute.compile is
        with compiling_alone(self.compile_cache, graphs):
            # Two batches when decodes overlap: the memory of a decode beside the next denoising
            # is found short now (overlap off, or batch_limit halved), not in the first real batches.
            for chunks in warmup_batches(self.compute, self.base, calls=2 if self.overlap.on else 1):
                _, last = self._render_chunks(chunks, None, exact=False)
                self._collect(last)
        return time.perf_counter() - t0

    # --- Ray Data entry -------------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        pending = [i for i in range(n) if batch["status"][i] == "pending"]
        results = {r.image_id: r for r in self.render(requests_from_batch(batch, pending))}
        pixels, nonfinite, gpu_s, batch_ids, sizes = [], [], [], [], []
        measures: dict[str, list[float]] = {c: [] for c in MEASURE_COLUMNS}
        status, error = list(batch["status"]), list(batch["error"])
        for i in range(n):
            r = results.get(batch["image_id"][i])
            if r is not None and r.error:
                status[i], error[i] = "failed", r.error
            for column, value in (r.measures if r is not None and r.measures else Measures()).as_columns().items():
                measures[column].append(value)
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
            **{column: np.array(values, dtype=np.float64) for column, values in measures.items()},
        }

    # --- core -----------------------------------------------------------------------------------
    def render(self, requests: list[RenderRequest]) -> list[RenderResult]:
        """Render requests, grouped so that one group is one LoRA stack and one pipeline setting."""
        results: list[RenderResult] = []
        inflight = None  # the last batch's decode may run on while the next group's stack is set
        for _, members in groupby(sorted(requests, key=group_key), key=group_key):
            group = list(members)
            try:
                self._prepare(group[0])
            except (ModelFileError, KeyError) as e:
                results += [RenderResult(r.image_id, None, error=f"model_error: {e}") for r in group]
                continue
            if group[0].conditioning is not None:
                results += self._collect(inflight) + [self._render_conditioned(r) for r in group]
                inflight = None
                continue
            done, inflight = self._render_chunks(self.batch_sizes.split(group), inflight, exact=False)
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
            if ordered[0].conditioning is not None:  # rendered alone, as always
                results += self._collect(inflight) + [self._render_conditioned(r) for r in ordered]
                inflight = None
                continue
            done, inflight = self._render_chunks([ordered], inflight, exact=True)
            results += done
        return results + self._collect(inflight)

    def _render_chunks(
        self, chunks: list[list[RenderRequest]], inflight: InFlight | None, exact: bool
    ) -> tuple[list[RenderResult], InFlight | None]:
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
                started = self._start(chunk, raise_oom=inflight is not None or BatchSizes.can_split(chunk, exact))
            except torch.OutOfMemoryError:
                if inflight is not None:
                    results += self._collect(inflight)
                    inflight = None
                    self.overlap.stop()
                    queue.insert(0, chunk)
                else:
                    queue = self.batch_sizes.halve(chunk, queue)
                    self.accelerator_settings = self._describe_device()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results += self._collect(inflight)
            inflight = started
            if not self.overlap.on:
                results += self._collect(inflight)
                inflight = None
        return results, inflight

    def _prepare(self, first: RenderRequest) -> None:
        """Set the LoRA stack and the scheduler of the group `first` leads."""
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

    def _render_conditioned(self, r: RenderRequest) -> RenderResult:
        """One image-conditioned request (app/generator/conditioned.py); its inputs' problems and
        kernel errors fail this request only."""
        t0 = time.perf_counter()
        self._set_vae_tiling(r)
        try:
            with torch.inference_mode(), attention_kernels(self.compute.attention):
                pixels, bad, measures = self.conditioned.render(r)
        except ConditioningError as e:
            return RenderResult(r.image_id, None, error=f"bad_input: {e}")
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return RenderResult(r.image_id, None, error=out_of_memory_error([r]))
        except Exception as e:  # a kernel error: this row fails, the actor lives on
            return RenderResult(r.image_id, None, error=f"generate_error: {type(e).__name__}: {e}")
        seconds = time.perf_counter() - t0
        return RenderResult(
            r.image_id, pixels, nonfinite_fraction=bad, gpu_seconds=seconds, batch_id=r.image_id, measures=measures
        )

    def _start(self, chunk: list[RenderRequest], raise_oom: bool) -> InFlight:
        """Denoise a chunk, then queue its decode and the copy of its pixels to the host: on the
        decode stream when there is one, so that the next chunk's denoising need not wait."""
        name = batch_id(chunk)
        padded = self.batch_sizes.pad(chunk)
        self._set_vae_tiling(chunk[0])
        t0 = time.perf_counter()
        try:
            # The attention choice is in force for the denoising and the decode, and so for any
            # compiling they trigger (a compiled graph keeps the kernel it was traced with).
            with torch.inference_mode(), attention_kernels(self.compute.attention):
                latents = self._denoise(padded)
                decode = functools.partial(self._decode, keep=len(chunk))
                return self.overlap.start(chunk, name, t0, latents, decode)
        except torch.OutOfMemoryError:
            if raise_oom:
                raise
            return InFlight(chunk, error=out_of_memory_error(chunk))
        except Exception as e:  # a kernel error: these rows fail, the actor lives on
            return InFlight(chunk, error=f"generate_error: {type(e).__name__}: {e}")

    def _set_vae_tiling(self, r0: RenderRequest) -> None:
        # VAE tiling only for images above the threshold: tiles blend at their seams, so it is a
        # function of the size alone (regenerate decodes the same way).
        if r0.width * r0.height > self.compute.vae_tiling_above:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()

    def _denoise(self, padded: list[RenderRequest]) -> torch.Tensor:
        """The pipeline up to latents: [B, 4, H/8, W/8]."""
        r0 = padded[0]
        return self.pipe(
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

    def _decode(self, latents: torch.Tensor, keep: int) -> torch.Tensor:
        """The padded batch's latents -> its first `keep` images, [keep, 3, H, W] in [0, 1]."""
        # The padded batch decodes whole: one compiled decoder shape per size.
        return decode_latents(self.pipe, latents)[:keep]

    def _collect(self, inflight: InFlight | None) -> list[RenderResult]:
        """A started chunk's results, once its pixels are on the host (`DecodeOverlap.collect`)."""
        if inflight is None:
            return []
        chunk = inflight.chunk
        if inflight.error:
            return [RenderResult(r.image_id, None, error=inflight.error) for r in chunk]
        try:
            pixels, nonfinite, seconds = self.overlap.collect(inflight)
        except Exception as e:  # a kernel error in the decode, reported when it is waited for
            return [RenderResult(r.image_id, None, error=f"generate_error: {type(e).__name__}: {e}") for r in chunk]
        return [
            RenderResult(
                r.image_id,
                px,
                nonfinite_fraction=b,
                gpu_seconds=seconds,
                batch_id=inflight.batch_id,
                batch_size=len(chunk),
            )
            for r, px, b in zip(chunk, pixels, nonfinite)
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
