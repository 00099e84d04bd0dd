"""Loading resolved models into diffusers: base pipelines and LoRA stacks.

Imports torch and diffusers, so only generators import it. Every path here goes through
`from_pretrained` / `from_single_file` / `load_lora_weights` with safetensors only, the same calls
that load the released SDXL and its LoRAs.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from app.models.catalog import ResolvedModel
from app.models.digest import ModelFileError
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


def quiet_libraries() -> None:
    """Loading bars and "no text-encoder LoRA keys" notices would flood every actor's log."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    import warnings

    # peft warns on every second adapter loaded into one model: intended here (a LoRA cache).
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_pipeline(base: ResolvedModel, device: torch.device, dtype: torch.dtype):
    """A StableDiffusionXLPipeline for `base` on `device`, progress bars off."""
    from diffusers import StableDiffusionXLPipeline

    quiet_libraries()
    try:
        if base.source.startswith("file:") or base.path.endswith(".safetensors"):
            if not base.config:
                raise ModelFileError(f"{base.path}: single-file base '{base.name}' needs `config` (a diffusers folder)")
            pipe = StableDiffusionXLPipeline.from_single_file(
                base.path, config=base.config, local_files_only=True, dtype=dtype
            )
            _require_all_weights(pipe, base)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                base.path, dtype=dtype, use_safetensors=True, local_files_only=True
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
class LoraStackSwitcher:
    """Keeps a pipeline's active LoRA stack equal to the one asked for, with an adapter cache.

    Adapters stay loaded between switches (loading is the slow part); the least recently used are
    deleted past `max_loaded`, since `set_adapters` slows down as inactive adapters pile up.

    `fuse=True` merges the stack into the weights (no per-layer LoRA matmuls while it stays).
    Unfusing subtracts the merged delta again, which does not give the original bits back, so the
    touched weights are copied before fusing and restored exactly after: every other stack then
    renders the same pixels whether or not a fused stack ran before it.
    """

    max_loaded: int = 6
    fuse_qkv: bool = False  # the pipeline's QKV projections are fused whenever that is correct
    switches: int = 0
    switch_seconds: float = 0.0
    loaded: OrderedDict = field(default_factory=OrderedDict)  # adapter name -> ResolvedModel
    active: tuple = ()
    fused: bool = False
    _saved: dict = field(default_factory=dict)  # module name -> (weight, bias) before fusing

    def apply(self, pipe, stack: list[tuple[ResolvedModel, float]], fuse: bool = False) -> None:
        wanted = tuple((adapter_name(lo), float(w)) for lo, w in stack)
        fuse = fuse and bool(wanted)
        if wanted == self.active and fuse == self.fused:
            return
        t0 = time.perf_counter()
        if self.fuse_qkv:
            # Fused QKV layers bypass unfused LoRA adapters (measured: a 0.25 difference in the
            # image), so they are split for every switch and fused again only when no adapter
            # computes separately: no stack, or a stack merged into the weights.
            pipe.unfuse_qkv_projections()
        if self.fused:
            self._unfuse(pipe)
        for lo, _ in stack:
            name = adapter_name(lo)
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            try:
                pipe.load_lora_weights(lo.path, weight_name=lo.weight_name, adapter_name=name, use_safetensors=True)
            except Exception as e:
                self._drop(pipe, name)
                raise ModelFileError(f"{lo.path}: cannot load LoRA '{lo.name}' into this base: {_first_lines(e)}") from e
            self.loaded[name] = lo
        in_use = {n for n, _ in wanted}
        while len(self.loaded) > self.max_loaded:
            victim = next((n for n in self.loaded if n not in in_use), None)
            if victim is None:
                break
            self._drop(pipe, victim)
        if wanted:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in wanted], adapter_weights=[w for _, w in wanted])
        elif self.loaded:
            pipe.disable_lora()
        if fuse:
            self._fuse(pipe, [n for n, _ in wanted])
        if self.fuse_qkv and (fuse or not wanted):
            pipe.fuse_qkv_projections()
        self.active = wanted
        self.switches += 1
        self.switch_seconds += time.perf_counter() - t0

    def _fuse(self, pipe, names: list[str]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._saved = {
            name: (m.get_base_layer().weight.detach().clone(),
                   None if m.get_base_layer().bias is None else m.get_base_layer().bias.detach().clone())
            for name, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer)
        }
        pipe.fuse_lora(components=["unet"], adapter_names=names)
        self.fused = True

    def _unfuse(self, pipe) -> None:
        import torch

        pipe.unfuse_lora(components=["unet"])
        modules = dict(pipe.unet.named_modules())
        with torch.no_grad():
            for name, (weight, bias) in self._saved.items():
                base = modules[name].get_base_layer()
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
        self._saved = {}
        self.fused = False

    def _drop(self, pipe, name: str) -> None:
        self.loaded.pop(name, None)
        try:
            pipe.delete_adapters(name)
        except Exception:  # a half-loaded adapter may not be registered everywhere
            pass


def _first_lines(e: Exception, n: int = 3) -> str:
    """peft lists every mismatched tensor (hundreds of lines); the first few say what happened."""
    lines = str(e).strip().splitlines()
    more = f" … ({len(lines) - n} more lines)" if len(lines) > n else ""
    return " / ".join(line.strip() for line in lines[:n]) + more
