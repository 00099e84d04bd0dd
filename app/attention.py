"""Which fused attention kernel the generators' scaled_dot_product_attention calls use.

`compute.attention` names the kernel to try first; the kernels after it on this ladder stay on
as fallbacks, for calls it cannot take (SDXL's VAE attends with one head of 512 channels, which
neither cuDNN's nor the flash kernel takes):

    cudnn      cuDNN's fused attention (CUDA; Hopper kernels of its own, where torch's flash
               kernel is FlashAttention-2)
    flash      FlashAttention-2 on CUDA, torch's fused kernel on the CPU
    efficient  the memory-efficient (CUTLASS) kernel (CUDA)
    math       the unfused reference arithmetic: the scores are materialised

"auto" leaves torch's own order alone (flash, efficient, math; cuDNN last on CUDA). Torch
honours the order on CUDA; its CPU path has a fixed order (flash, then math) but honours which
kernels are on, which is why each choice turns the kernels before it off rather than only
reordering them.

Two cautions the generator follows:
  * The choice must be in force while a graph is compiled (torch.compile traces the kernel chosen
    then, with no guard on it) and whenever it runs: `attention_kernels` wraps both.
  * Inductor's on-disk caches key a graph by what dynamo saw (one `scaled_dot_product_attention`
    call), not by the kernel it was traced to: a graph compiled under one choice loads under
    another (measured here, CPU, torch 2.14: an "auto" process ran the math kernel of a graph an
    earlier "math" process had cached). So each choice other than "auto" has its own cache
    folder (`cache_folder`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

LADDER = ("cudnn", "flash", "efficient", "math")
CHOICES = ("auto", *LADDER)


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def kernel_order(choice: str) -> list[str]:
    """The kernels `choice` turns on, in the order tried: the choice, then the ones after it."""
    if choice not in CHOICES:
        raise ValueError(f"attention kernel {choice!r}: one of {', '.join(CHOICES)}")
    return [] if choice == "auto" else list(LADDER[LADDER.index(choice) :])


@contextlib.contextmanager
def attention_kernels(choice: str):
    """Scaled-dot-product attention inside the block uses `choice` first (see the module doc);
    "auto" changes nothing. The previous setting comes back on exit."""
    order = kernel_order(choice)
    if not order:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_backend(name) for name in order], set_priority=True):
        yield


def cache_folder(choice: str) -> str:
    """The compile-cache subfolder for graphs traced under `choice` ("" for "auto")."""
    kernel_order(choice)  # validates
    return "" if choice == "auto" else f"attention-{choice}"


@functools.cache
def _probe(choice: str, device_type: str, device_index: int | None, dtype: torch.dtype) -> str | None:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    from torch.nn.attention import sdpa_kernel

    g = torch.Generator(device).manual_seed(0)
    # One of SDXL's shapes, small: 2 latents, 10 heads of 64 channels, 256 tokens.
    q, k, v = (torch.randn(2, 10, 256, 64, device=device, dtype=dtype, generator=g) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([_backend(choice)]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            if not torch.isfinite(out).all():
                return f"the {choice} kernel gave non-finite values on {device} in {dtype}"
        except RuntimeError as e:
            reasons = "; ".join(str(w.message).strip() for w in caught if str(w.message).strip())
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"the {choice} attention kernel cannot run on {device} in {dtype}: " + (reasons or first)
    return None


def attention_unsupported_reason(choice: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `choice` cannot be this generator's first attention kernel, or None when it can
    (checked once per process and device by running it alone on one of SDXL's shapes)."""
    kernel_order(choice)
    if choice == "auto":
        return None
    return _probe(choice, device.type, device.index, dtype)
