"""Compute settings of the generators: the part of the spec the GPU stage reads.

Its own module, importing only pydantic, so that `app.generator` runs on a bare GPU machine
(benchmarks/gpu_bench.py) without the QC and post-processing dependencies of the full spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ComputeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    generators: int | None = Field(None, ge=1, le=1024)  # actor pool size; None: one per GPU, else 1
    batch_size: int = Field(4, ge=1, le=256)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # Torch threads per CPU generator: results depend on it, so it is fixed rather than "all cores".
    cpu_threads: int = Field(1, ge=1, le=256)
    # True: every image is denoised in a batch of its own, so its pixels never depend on which
    # rows it was batched with. False: whole batches (faster on GPUs); regenerating an image then
    # re-renders its recorded batch.
    batch_invariant: bool = True
    qc_workers: int = Field(1, ge=1, le=1024)
    # Custom Ray resources (cluster.yaml node types declare them): each generator needs one unit of
    # `accelerator_resource` (e.g. gpu_bulk, gpu_hero), each QC/post worker one of `qc_resource`.
    accelerator_resource: str | None = None
    qc_resource: str | None = None
    # Speed (app/generator/pipeline.py). None: on for CUDA, off for CPU. Each is recorded in the catalog's
    # `accelerator` (they can change the last bits) and `regenerate` applies the same.
    fuse_qkv: bool | None = None  # one QKV matmul per attention; LoRA stacks then render fused
    channels_last: bool | None = None  # NHWC convolutions
    compile: bool = False  # torch.compile the UNet and VAE decoder (minutes per new shape)
    # Inductor mode. "default" compiled SDXL with FP8 in 167 s on an H100; "max-autotune-no-cudagraphs"
    # had not finished after 7 minutes (it times Triton templates against cuDNN/cuBLAS for every op
    # shape; cuDNN won every convolution it timed). "max-autotune" and "reduce-overhead" add CUDA
    # graphs (fewer launches: matters at batch 1-2). A mode other than "default" is recorded in
    # `accelerator` as `+compile_mode=…`.
    compile_mode: Literal["max-autotune-no-cudagraphs", "max-autotune", "default", "reduce-overhead"] = "default"
    # FP8 (e4m3, row-wise scales) weights and activations in the UNet's transformer Linear layers
    # (app/fp8.py): needs an sm_89+ GPU (or the CPU), pays off compiled. Checked at actor start:
    # the UNet's output may move at most `fp8_max_error` (relative) from the unquantised one.
    fp8: bool = False
    fp8_max_error: float = Field(0.05, gt=0.0, le=1.0)
    # FP8 matmuls accumulate in the tensor cores' own format (fast; torchao's inference default)
    # rather than promoting to fp32 every 128 products. False: the exact-fp32 variant, recorded
    # as `+fp8_fp32_accum` in `accelerator`.
    fp8_fast_accum: bool = True
    # The attention kernel tried first (app/attention.py): "cudnn" (cuDNN's fused attention, with
    # Hopper kernels of its own), "flash", "efficient", "math", each with the later ones as
    # fallbacks; "auto" is torch's own order. Checked at actor start; a choice other than "auto" is
    # recorded in `accelerator` as `+attention=…` and compiles into a cache folder of its own.
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    warmup_sizes: tuple[str, ...] = ()  # sizes to compile at actor start: "1024x1024", …
    # Inductor's caches (compiled graphs, autotuning, kernels), shared by every generator that
    # points at the same directory: one compiles a shape, the others load it. None:
    # $IMAGEFAB_HOME/compile-cache (shared per node); a shared filesystem path shares it cluster-wide.
    compile_cache: str | None = None
    # Images with more pixels than this are VAE-decoded in tiles (less memory, seams blended: the
    # pixels differ slightly, so it depends on the size alone). Default: above 2048x2048.
    vae_tiling_above: int = Field(2048 * 2048, ge=64 * 64)
    # Decode each batch on a second CUDA stream while the next batch denoises, and copy its pixels
    # to the host without stopping the GPU (same kernels: the pixels do not change). None: on for
    # CUDA unless compile_mode captures CUDA graphs, off for the CPU. A batch that runs out of
    # memory while another is still decoding turns it off for the generator's life.
    decode_overlap: bool | None = None

    def overlaps_decode(self, on_cuda: bool) -> bool:
        """Whether generators on this device decode one batch while the next denoises."""
        if self.decode_overlap is not None:
            return self.decode_overlap
        return on_cuda and not (self.compile and self.compile_mode in ("max-autotune", "reduce-overhead"))
