"""Loading resolved models into diffusers: base pipelines and LoRA stacks.

Imports torch and diffusers, so only generators import it. Every path here goes through
`from_pretrained` / `from_single_file` / `load_lora_weights` with safetensors only, the same calls
that load the released SDXL and its LoRAs.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app.models.catalog import ResolvedModel
from app.models.digest import ModelFileError
from app.models.library_logging import quiet_libraries
from app.schedulers import SCHEDULERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device is 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(model_dtype: str, device: torch.device) -> torch.dtype:
    if model_dtype != "auto":
        return DTYPES[model_dtype]
    # bf16 is SDXL's usual GPU precision; CPUs are exact and fast enough in float32 for the tiny model.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pipeline_class(base: ResolvedModel):
    """The diffusers pipeline class a base's checkpoint is loaded as (its catalog `pipeline`)."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLInpaintPipeline if base.pipeline == "inpaint" else StableDiffusionXLPipeline


def load_pipeline(base: ResolvedModel, device: torch.device, dtype: torch.dtype):
    """The pipeline for `base` on `device` (`pipeline_class`: SDXL, or SDXL inpainting for an
    inpainting checkpoint), progress bars off.

    diffusers switches on its own invisible watermark whenever the `invisible-watermark` package
    can be imported; that would make an image's pixels depend on what else is installed (and
    refuses images under 256 px). imagefab marks its outputs in post-processing, so the
    pipeline's is always off."""
    pipeline_cls = pipeline_class(base)

    quiet_libraries()
    try:
        if base.source.startswith("file:") or base.path.endswith(".safetensors"):
            if not base.config:
                raise ModelFileError(f"{base.path}: single-file base '{base.name}' needs `config` (a diffusers folder)")
            pipe = pipeline_cls.from_single_file(
                base.path, config=base.config, local_files_only=True, dtype=dtype, add_watermarker=False
            )
            _require_all_weights(pipe, base)
        else:
            pipe = pipeline_cls.from_pretrained(
                base.path, dtype=dtype, use_safetensors=True, local_files_only=True, add_watermarker=False
            )
    except ModelFileError:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors…
        raise ModelFileError(f"{base.path}: cannot load base model '{base.name}': {e}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _require_all_weights(pipe, base: ResolvedModel) -> None:
    """Raise if a component still has tensors on the meta device after a single-file load.

    `from_single_file` builds each model empty and fills in what it finds in the checkpoint; it does
    not report the weights it found no key for. Those stay on the meta device, and the first
    `.to(device)` then fails with a bare NotImplementedError that names no file or component.
    """
    for component_name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [*component.named_parameters(), *component.named_buffers()]
        empty = [n for n, t in tensors if t.is_meta]
        if empty:
            raise ModelFileError(
                f"{base.path}: single-file base '{base.name}' gave no weights for {len(empty)} of {len(tensors)} "
                f"tensors of `{component_name}` (e.g. {', '.join(empty[:3])}); the checkpoint does not match "
                f"the configs in {base.config}"
            )


def make_scheduler(name: str, base_config):
    import diffusers

    cls_name, extra, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def adapter_name(lora: ResolvedModel) -> str:
    # peft adapter names become module attribute keys: no dots.
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{lora.name}_{lora.sha256[:10]}")


@dataclass
class LoraFactor:
    """One UNet layer of one LoRA: delta W = scale * up @ down (convolutions flattened)."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    scale: float  # peft's scaling at adapter weight 1 (lora_alpha / r, or / sqrt(r) with rsLoRA)

    def delta(self, shape: torch.Size) -> torch.Tensor:
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape) * self.scale


@dataclass
class LoraStackSwitcher:
    """Keeps a pipeline's active LoRA stack equal to the one asked for, with an adapter cache.

    Adapters stay loaded between switches (loading is the slow part); the least recently used are
    deleted past `max_loaded`, since `set_adapters` slows down as inactive adapters pile up.

    Two ways to render a stack:
    - unfused (`fuse=False`): peft's adapter layers compute each LoRA beside the base weights.
    - fused (`fuse=True`): the stack's UNet deltas are added into the base weights here, from the
      low-rank factors kept per adapter (read from peft's layers once, at load). The touched
      weights are copied first and restored exactly on the next switch, so every stack renders
      the same pixels whatever ran before it. The UNet's module structure never changes, which
      is what lets a compiled UNet switch stacks without recompiling (`unet_adapters=False`:
      peft's UNet layers are removed right after reading the factors, and unfused stacks are
      refused). Fused QKV projections stay fused: they are rebuilt in place from to_q/to_k/to_v.
      Text-encoder parts of a LoRA always run as peft adapters (the encoders are not compiled).
    """

    max_loaded: int = 6
    fuse_qkv: bool = False  # the pipeline's QKV projections are fused whenever that is correct
    unet_adapters: bool = True  # keep peft layers in the UNet (needed for unfused stacks)
    after_change: Callable[[Any], object] | None = None  # called with the pipe after each switch (FP8 re-quantisation)
    switches: int = 0
    switch_seconds: float = 0.0
    loaded: OrderedDict = field(default_factory=OrderedDict)  # adapter name -> ResolvedModel
    factors: dict = field(default_factory=dict)  # adapter name -> {UNet module path: LoraFactor}
    active: tuple = ()
    fused: bool = False
    _saved: dict = field(default_factory=dict)  # UNet module path -> weight before merging
    _qkv_split: bool = False  # QKV unfused for an unfused stack

    def apply(self, pipe, stack: list[tuple[ResolvedModel, float]], fuse: bool = False) -> None:
        wanted = tuple((adapter_name(lo), float(w)) for lo, w in stack)
        fuse = fuse and bool(wanted)
        if wanted == self.active and fuse == self.fused:
            return
        if wanted and not fuse and not self.unet_adapters:
            raise ModelFileError(
                "this generator's UNet is compiled, so LoRA stacks render fused (set `fuse_loras: true`); "
                "unfused adapters would recompile it for every stack"
            )
        t0 = time.perf_counter()
        self._load(pipe, stack)
        self._restore(pipe)
        unet_has_peft = bool(getattr(pipe.unet, "peft_config", None))
        if fuse or not wanted:
            if unet_has_peft:
                pipe.unet.disable_lora()
            if self._qkv_split:
                pipe.fuse_qkv_projections()
                self._qkv_split = False
            if fuse:
                self._merge(pipe, wanted)
        else:
            if self.fuse_qkv and not self._qkv_split:
                # Fused QKV layers bypass unfused LoRA adapters (measured: a 0.25 difference in
                # the image), so they are split while an unfused stack is active.
                pipe.unfuse_qkv_projections()
                self._qkv_split = True
            pipe.unet.enable_lora()
            pipe.unet.set_adapters([n for n, _ in wanted], [w for _, w in wanted])
        self._set_text_encoders(pipe, wanted)
        if self.after_change is not None:
            self.after_change(pipe)
        self.active, self.fused = wanted, fuse
        self.switches += 1
        self.switch_seconds += time.perf_counter() - t0

    # --- adapters ---------------------------------------------------------------------------------
    def _load(self, pipe, stack) -> None:
        for lo, _ in stack:
            name = adapter_name(lo)
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            try:
                pipe.load_lora_weights(lo.path, weight_name=lo.weight_name, adapter_name=name, use_safetensors=True)
                self.factors[name] = _read_factors(pipe.unet, name, lo)
            except Exception as e:
                self._drop(pipe, name)
                if isinstance(e, ModelFileError):
                    raise
                raise ModelFileError(
                    f"{lo.path}: cannot load LoRA '{lo.name}' into this base: {_first_lines(e)}"
                ) from e
            finally:
                if not self.unet_adapters and getattr(pipe.unet, "peft_config", None):
                    pipe.unet.unload_lora()  # back to the plain modules the compiled graph was traced on
            self.loaded[name] = lo
        in_use = {adapter_name(lo) for lo, _ in stack}
        while len(self.loaded) > self.max_loaded:
            victim = next((n for n in self.loaded if n not in in_use), None)
            if victim is None:
                break
            self._drop(pipe, victim)

    def _drop(self, pipe, name: str) -> None:
        self.loaded.pop(name, None)
        self.factors.pop(name, None)
        with contextlib.suppress(Exception):  # a half-loaded adapter may not be registered everywhere
            pipe.delete_adapters(name)

    def _set_text_encoders(self, pipe, wanted: tuple) -> None:
        from diffusers.loaders.lora_base import disable_lora_for_text_encoder, set_adapters_for_text_encoder

        for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
            present = set(getattr(encoder, "peft_config", None) or {})
            if not present:
                continue
            mine = [(n, w) for n, w in wanted if n in present]
            if mine:
                set_adapters_for_text_encoder([n for n, _ in mine], encoder, [w for _, w in mine])
            else:
                disable_lora_for_text_encoder(encoder)

    # --- merging ----------------------------------------------------------------------------------
    def _merge(self, pipe, wanted: tuple) -> None:
        modules = dict(pipe.unet.named_modules())
        uses: dict[str, list] = {}  # module path -> [(factor, adapter weight)]
        for name, weight in wanted:
            for path, factor in self.factors[name].items():
                uses.setdefault(path, []).append((factor, weight))
        with torch.no_grad():
            # Layer by layer: a full-size float32 delta exists for one layer at a time (all of
            # SDXL's at once would be gigabytes), summed in float32 and rounded once.
            for path, layer_uses in uses.items():
                w = _base_layer(modules[path]).weight
                self._saved[path] = w.detach().clone()
                total = w.to(torch.float32, copy=True)
                for factor, weight in layer_uses:
                    total += factor.delta(w.shape).to(w.device) * weight
                w.copy_(total.to(w.dtype))
        self._after(pipe, modules, uses)

    def _restore(self, pipe) -> None:
        if not self._saved:
            return
        modules = dict(pipe.unet.named_modules())
        with torch.no_grad():
            for path, weight in self._saved.items():
                _base_layer(modules[path]).weight.copy_(weight)
        touched, self._saved = self._saved, {}
        self._after(pipe, modules, touched)

    def _after(self, pipe, modules: dict, touched: dict) -> None:
        """Rebuild fused QKV weights (in place) of the attentions whose projections changed."""
        parents = {path.rsplit(".", 1)[0] for path in touched if path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")}
        with torch.no_grad():
            for parent in parents:
                attn = modules.get(parent)
                if attn is None or not getattr(attn, "fused_projections", False):
                    continue
                q, k, v = (_base_layer(getattr(attn, n)).weight for n in ("to_q", "to_k", "to_v"))
                if getattr(attn, "to_qkv", None) is not None and not attn.is_cross_attention:
                    attn.to_qkv.weight.copy_(torch.cat([q, k, v]))
                elif getattr(attn, "to_kv", None) is not None:
                    attn.to_kv.weight.copy_(torch.cat([k, v]))


def _base_layer(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _read_factors(unet, name: str, lora: ResolvedModel) -> dict[str, LoraFactor]:
    """The UNet layers of adapter `name` as low-rank factors (copies: peft's layers may go)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = {}
    for path, m in unet.named_modules():
        if not isinstance(m, BaseTunerLayer) or name not in getattr(m, "lora_A", {}):
            continue
        if getattr(m, "use_dora", {}).get(name) or getattr(m, "lora_bias", {}).get(name):
            raise ModelFileError(
                f"{lora.path}: LoRA '{lora.name}' uses DoRA or LoRA biases, which imagefab cannot merge"
            )
        # peft types BaseTunerLayer without the per-adapter attributes its LoRA layers all have
        down, up = m.lora_A[name].weight, m.lora_B[name].weight  # type: ignore[attr-defined]
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise ModelFileError(
                f"{lora.path}: LoRA '{lora.name}' layer {path} has an up-projection kernel {tuple(up.shape[2:])}"
            )
        r, alpha = m.r[name], m.lora_alpha[name]  # type: ignore[attr-defined]
        scale = alpha / math.sqrt(r) if m.use_rslora.get(name, False) else alpha / r  # type: ignore[attr-defined]
        found[path] = LoraFactor(down.detach().clone(), up.detach().clone(), float(scale))
    return found


def _first_lines(e: Exception, n: int = 3) -> str:
    """peft lists every mismatched tensor (hundreds of lines); the first few say what happened."""
    lines = str(e).strip().splitlines()
    more = f" … ({len(lines) - n} more lines)" if len(lines) > n else ""
    return " / ".join(line.strip() for line in lines[:n]) + more
