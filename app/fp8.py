"""FP8 (e4m3) weights and activations for the UNet's transformer Linear layers.

`quantize_linears(unet)` turns the selected `nn.Linear` modules into `Float8Linear` in place: the
same module objects, the same Parameter objects, one class further down. Each keeps its
high-precision `weight` as the master and adds two buffers derived from it:

    weight_fp8    [out, in] float8_e4m3fn, contiguous (so `.t()` is the column-major operand
                  `torch._scaled_mm` wants)
    weight_scale  [1, out]  float32, one scale per output feature (row-wise)

and its forward quantises each input row on the fly (one scale per token) and calls
`torch._scaled_mm`. Unfused, that quantisation is an extra pass over the activations and is slower
than a bf16 matmul on H100/H200; under `torch.compile` inductor fuses it into the neighbouring
kernels, which is the point. For inference: with autograd recording, the exact Linear runs
(`_scaled_mm` has no derivative). Quantise before `torch.compile` where possible; converting a
compiled module's layers later is still correct (dynamo guards on the module class and
recompiles once).

Why a subclass of `nn.Linear`, and why the master weight stays:
  * peft (and so diffusers' `load_lora_weights`) wraps layers that are `nn.Linear`; a Float8Linear
    is one, so LoRA adapters attach to it as `base_layer` and run beside it unchanged.
  * `fuse_lora` / `unfuse_lora` (and LoraStackSwitcher's exact restore) rewrite
    `base_layer.weight` in place. The FP8 copy is then stale until `refresh_all(unet)`, which
    re-quantises into the same buffers (`copy_`), so a compiled graph that holds them stays valid
    and does not recompile. Keeping the master costs one FP8 byte per weight on top of bf16's two.

Accumulation: `fast_accum` (default True, as torchao's inference and forward passes do) lets
Hopper's FP8 tensor cores keep their own reduced-precision accumulator for the whole K loop
instead of promoting to fp32 every 128 products. Torch's row-wise CUTLASS kernel is much slower
without it (pytorch/pytorch#147971; torchao routes slow-accumulation row-wise matmuls to another
kernel for that reason). The actor-start error check (`compute.fp8_max_error`) measures it with
the rest; `fast_accum=False` is the exact-fp32 variant. CPUs ignore the flag.

Order with diffusers' QKV fusion: `fuse_qkv_projections()` builds new plain `nn.Linear` modules
(`to_qkv` for self-attention, `to_kv` for cross-attention) from the master weights of
to_q/to_k/to_v, so quantise after fusing; calling `quantize_linears` again after each
`fuse_qkv_projections()` converts only the new layers (it is idempotent). With row-wise weight
scales and one activation scale per row, the fused layer's FP8 numbers are the same as the three
separate layers': fusing and quantising commute.

Default selection: every Linear inside a transformer block (attention to_q/to_k/to_v/to_out.0,
fused to_qkv/to_kv, feed-forward ff.net.0.proj and ff.net.2), which in SDXL is about 98% of the
Linear FLOPs. Left in high precision: the time/class embeddings and the resnets' time_emb_proj
(one row per image: nothing to gain), the convolutions (not Linear), LoRA adapter weights, and
the transformers' proj_in/proj_out: two C x C matmuls per transformer against 18 per block
(SDXL's transformers are 2 and 10 blocks deep), about 2% of the Linear FLOPs at 1024x1024, too
little to be worth their error. Any other selection can be passed as an `include` pattern.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import cast

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
# A row of zeros gets this amax instead of 0, so its scale is never 0 and 0 / scale stays 0.
AMAX_FLOOR = 1e-12
# `torch._scaled_mm` needs both dimensions of its second operand to be multiples of 16.
ALIGN = 16
DEFAULT_INCLUDE = r"(^|\.)transformer_blocks\.\d+\.(attn1|attn2|ff)\."
_LORA_PART = re.compile(r"(^|\.)lora_")
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One e4m3 scale per row of `t` [R, K]: ([R, K] float8_e4m3fn, [R, 1] float32 scales).

    Plain torch ops, so that inductor can fuse them into the kernel that produced `t`.
    """
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    # Saturate: the float -> float8 cast may give NaN past 448 (e4m3fn has no inf), and
    # division rounding can land a hair above it.
    q = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_supported(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether Float8Linear's matmul runs on `device` with `dtype` inputs and outputs."""
    return fp8_unsupported_reason(device, dtype) is None


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why Float8Linear cannot run on `device` with `dtype` outputs, or None when it can.

    Not read from version tables: one 16x32x16 `torch._scaled_mm` with row-wise scales is tried
    (once per device and dtype). Row-wise scaling differs by build: CUDA needs sm_89+ and (for
    row-wise scales) bfloat16 outputs; torch 2.11's CPU kernel takes per-tensor scales only.
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 matmuls: 8.9+ needed"
        )
    if device.type not in ("cuda", "cpu"):
        return f"FP8 matmuls are only tried on CUDA GPUs and CPUs, not {device.type}"
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return f"FP8 matmuls write {dtype} outputs here: bfloat16, float16 or float32 expected"
    return _probe_scaled_mm(str(device), dtype)


@functools.cache
def _probe_scaled_mm(device: str, dtype: torch.dtype) -> str | None:
    a = torch.linspace(-1.0, 1.0, 16 * 32, device=device).reshape(16, 32)
    b = torch.linspace(1.0, -1.0, 16 * 32, device=device).reshape(16, 32)
    (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
    try:
        y = torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=dtype)
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"torch {torch.__version__} cannot run row-wise scaled FP8 matmuls on {device} into {dtype}: {first}"
    y = y.float()
    if not torch.isfinite(y).all() or relative_error(a @ b.t(), y) > 0.1:
        return f"torch {torch.__version__}'s row-wise scaled FP8 matmul on {device} gives wrong numbers"
    return None


class Float8Linear(torch.nn.Linear):
    """A Linear whose matmul runs in FP8: e4m3 weights (row-wise scales) and inputs (per-row scales).

    `weight` is the high-precision master; `weight_fp8` and `weight_scale` are quantised from it
    and must be brought up to date with `refresh()` after the master changes in place (LoRA
    fusing, `copy_`). Loading a state dict and `.to(dtype)` refresh by themselves. With autograd
    recording (grad enabled and the input or weight requiring grad) it computes the exact
    high-precision Linear instead, since `torch._scaled_mm` has no derivative.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    fast_accum: bool = True  # the tensor cores' own accumulator (see the module's docstring)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        _check_aligned(in_features, out_features)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_fp8_buffers()

    @classmethod
    def convert_(cls, linear: torch.nn.Linear) -> Float8Linear:
        """Make `linear` (exactly an `nn.Linear`) a Float8Linear in place and return it.

        The module object and its Parameters stay the same, so whatever holds them (a parent
        module, a peft LoRA layer as `base_layer`, a saved-weights dict) keeps working.
        """
        if type(linear) is not torch.nn.Linear:
            raise TypeError(f"Float8Linear.convert_ takes an nn.Linear, not {type(linear).__name__}")
        _check_aligned(linear.in_features, linear.out_features)
        linear.__class__ = cls
        fp8 = cast("Float8Linear", linear)
        fp8._add_fp8_buffers()
        return fp8

    def _add_fp8_buffers(self) -> None:
        # Not persistent: they are derived from `weight`, so state dicts and saved models are unchanged.
        device = self.weight.device
        self.register_buffer("weight_fp8", torch.empty(self.weight.shape, dtype=FP8, device=device), persistent=False)
        self.register_buffer(
            "weight_scale", torch.empty(1, self.out_features, dtype=torch.float32, device=device), persistent=False
        )
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-quantise from the current master weight, into the existing buffers."""
        q, scale = quantize_rows(self.weight)  # [out, in], [out, 1]
        self.weight_fp8.copy_(q)
        self.weight_scale.copy_(scale.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if x.dtype not in _FLOAT_INPUTS or x.shape[-1] % ALIGN or x.numel() == 0 or self._recording_grad(x):
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        xq, x_scale = quantize_rows(x2)  # [M, in] e4m3, [M, 1]
        y = torch._scaled_mm(
            xq.contiguous(),
            self.weight_fp8.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )  # [M, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _recording_grad(self, x: torch.Tensor) -> bool:
        # `_scaled_mm` has no derivative: under autograd the exact matmul runs instead (and
        # torch.compile would otherwise fail building the backward). Pipelines run under no_grad.
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # `.to(dtype)` / `.half()` cast every floating tensor, float8 buffers included: rebuild
        # them from the (cast) master. Moves between devices keep their dtypes and need nothing.
        if self.weight_fp8.dtype != FP8 or self.weight_scale.dtype != torch.float32:
            device = self.weight.device
            self.weight_fp8 = torch.empty(self.weight.shape, dtype=FP8, device=device)
            self.weight_scale = torch.empty(1, self.out_features, dtype=torch.float32, device=device)
            self.refresh()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3fn row-wise, fast_accum={self.fast_accum}"


@dataclass(frozen=True)
class Fp8Report:
    """What `quantize_linears` did, and how much of the module's Linear weights now run in FP8."""

    converted: tuple[str, ...]  # layers this call converted
    layers: int  # Float8Linear layers in the module now (this call's and earlier ones)
    parameters_covered: int  # weight elements of those layers
    linear_parameters: int  # weight elements of all the module's Linear layers, LoRA adapters excluded
    skipped: dict[str, str]  # Linear layers left in high precision -> why

    @property
    def share(self) -> float:
        """Share of the module's Linear weight elements that run in FP8."""
        return self.parameters_covered / self.linear_parameters if self.linear_parameters else 0.0


def quantize_linears(
    module: torch.nn.Module, *, min_features: int = ALIGN, include: str | None = None, fast_accum: bool = True
) -> Fp8Report:
    """Convert the selected Linear layers of `module` to Float8Linear in place; idempotent.

    `include`: a regex searched in each layer's qualified name (default DEFAULT_INCLUDE: the
    transformer blocks' attention and feed-forward layers). `min_features`: layers with fewer
    input or output features stay in high precision. Layers whose features are not multiples of
    16 are never converted (`torch._scaled_mm` cannot take them), nor LoRA adapter weights (peft's
    lora_A/lora_B/...: they are trained deltas, small, and peft expects them plain).
    `fast_accum` is set on every Float8Linear selected, the ones converted earlier included.
    Call after `fuse_qkv_projections()` and after moving the module to its device and dtype.
    """
    if min_features < 1:
        raise ValueError(f"min_features must be at least 1, got {min_features}")
    pattern = re.compile(include if include is not None else DEFAULT_INCLUDE)
    converted, skipped = [], {}
    layers = covered = total = 0
    for name, m in list(module.named_modules()):
        if not isinstance(m, torch.nn.Linear):
            continue
        if _LORA_PART.search(name):
            skipped[name] = "LoRA adapter weights"
            continue
        total += m.weight.numel()
        reason = _skip_reason(name, m, pattern, min_features)
        if reason:
            skipped[name] = reason
            continue
        if not isinstance(m, Float8Linear):
            m = Float8Linear.convert_(m)
            converted.append(name)
        m.fast_accum = fast_accum
        layers += 1
        covered += m.weight.numel()
    return Fp8Report(tuple(converted), layers, covered, total, skipped)


def _skip_reason(name: str, m: torch.nn.Linear, pattern: re.Pattern, min_features: int) -> str:
    if isinstance(m, Float8Linear):
        return ""
    if not pattern.search(name):
        return "name not matched by include"
    if type(m) is not torch.nn.Linear:
        return f"a {type(m).__name__}, not a plain nn.Linear (its forward may differ)"
    if m.in_features % ALIGN or m.out_features % ALIGN:
        return f"features {m.in_features}->{m.out_features} are not multiples of {ALIGN}"
    if min(m.in_features, m.out_features) < min_features:
        return f"features {m.in_features}->{m.out_features} below min_features={min_features}"
    if not m.weight.is_floating_point() or m.weight.is_meta:
        return f"weight is {m.weight.dtype} on {m.weight.device}"
    return ""


def refresh_all(module: torch.nn.Module) -> int:
    """Re-quantise every Float8Linear in `module` (peft `base_layer`s included) from its master; how many."""
    n = 0
    for m in module.modules():
        if isinstance(m, Float8Linear):
            m.refresh()
            n += 1
    return n


def relative_error(reference: torch.Tensor, test: torch.Tensor) -> float:
    """||test - reference|| / ||reference||, in float32."""
    reference, test = reference.detach().float(), test.detach().float()
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, test {tuple(test.shape)}")
    denom = reference.norm().item()
    diff = (test - reference).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / denom


def _check_aligned(in_features: int, out_features: int) -> None:
    if in_features % ALIGN or out_features % ALIGN:
        raise ValueError(
            f"Float8Linear needs in_features and out_features divisible by {ALIGN} (torch._scaled_mm), "
            f"got {in_features} and {out_features}"
        )
