"""What a generator rendered with: its device and every setting that can change an image's last
bits, recorded per image as a typed value (the catalog's `accelerator_settings` struct) and
applied again by `imagefab regenerate`.

`label()` is the same in words (`cpu:threads=1+attention=math`, `cuda:NVIDIA H100…+compiled+fp8`):
the catalog's `accelerator` text, which is what catalogs written before the struct existed hold,
and which price tables match device names against. `from_label` reads that older form back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

from app.compute import ComputeSpec

_DEFAULT = {name: f.default for name, f in ComputeSpec.model_fields.items()}
_ARROW = {"str": pa.string(), "int": pa.int64(), "bool": pa.bool_()}


@dataclass(frozen=True)
class AcceleratorSettings:
    device: str  # cuda | cpu
    device_name: str = ""  # the GPU's name; "" on the CPU
    threads: int = 0  # torch threads of a CPU generator (the last bits depend on them); 0 on CUDA
    dtype: str = ""  # the UNet's dtype as rendered (bfloat16, float16, float32); "" when not recorded
    fused_qkv: bool = False
    channels_last: bool = False
    compiled: bool = False
    compile_mode: str = _DEFAULT["compile_mode"]
    fp8: bool = False
    fp8_fast_accum: bool = True
    attention: str = "auto"
    batch_bucket: int = 0  # compiled batches padded to this size; 0: batches as they come
    vae_tiling_above: int = _DEFAULT["vae_tiling_above"]

    def label(self) -> str:
        """The settings in words; only what differs from the defaults, in a fixed order."""
        flags = "".join(
            f"+{name}"
            for name, on in (
                ("fused_qkv", self.fused_qkv),
                ("channels_last", self.channels_last),
                ("compiled", self.compiled),
                ("fp8", self.fp8),
                ("fp8_fp32_accum", self.fp8 and not self.fp8_fast_accum),
            )
            if on
        )
        if self.compiled and self.compile_mode != _DEFAULT["compile_mode"]:
            flags += f"+compile_mode={self.compile_mode}"
        if self.batch_bucket:
            flags += f"+batch_bucket={self.batch_bucket}"
        if self.vae_tiling_above != _DEFAULT["vae_tiling_above"]:
            flags += f"+vae_tiling_above={self.vae_tiling_above}"
        if self.attention != "auto":
            flags += f"+attention={self.attention}"
        if self.device == "cuda":
            return f"cuda:{self.device_name}{flags}"
        return f"{self.device}:threads={self.threads}{flags}"

    @classmethod
    def from_label(cls, text: str) -> AcceleratorSettings:
        """The settings from an `accelerator` text, as catalogs written before the struct hold them."""

        def value(key: str) -> str:  # value("+batch_bucket") of "cuda:…+batch_bucket=4+…" is "4"; "" when absent
            return text.partition(f"{key}=")[2].split("+", 1)[0]

        device = "cuda" if text.startswith("cuda") else "cpu"
        threads, bucket = value("threads"), value("+batch_bucket")
        tiling, mode, attention = value("+vae_tiling_above"), value("+compile_mode"), value("+attention")
        return cls(
            device=device,
            device_name=text.removeprefix("cuda:").split("+", 1)[0] if device == "cuda" else "",
            threads=int(threads) if threads.isdigit() else (0 if device == "cuda" else 1),
            fused_qkv="+fused_qkv" in text,
            channels_last="+channels_last" in text,
            compiled="+compiled" in text,
            compile_mode=mode or _DEFAULT["compile_mode"],
            fp8="+fp8" in text,
            fp8_fast_accum="+fp8_fp32_accum" not in text,
            attention=attention or "auto",
            batch_bucket=int(bucket) if bucket.isdigit() else 0,
            vae_tiling_above=int(tiling) if tiling.isdigit() else _DEFAULT["vae_tiling_above"],
        )

    @classmethod
    def from_catalog(cls, settings: Mapping | None, accelerator: str | None) -> AcceleratorSettings:
        """From a catalog row: its `accelerator_settings` struct, or, in a catalog written before
        that column existed, its `accelerator` text."""
        if settings:
            return cls.from_value(settings)
        return cls.from_label(accelerator or "")

    def to_value(self) -> dict:
        """One value of `ACCELERATOR_SETTINGS_TYPE`."""
        return asdict(self)

    @classmethod
    def from_value(cls, value: Mapping) -> AcceleratorSettings:
        """Inverse of `to_value`; a field the value lacks (a newer setting) takes its default."""
        return cls(**{f.name: value[f.name] for f in fields(cls) if value.get(f.name) is not None})

    def compute_spec(self, batch_size: int) -> ComputeSpec:
        """The generator settings that render an image again the same way, in a batch of
        `batch_size` (the size of its recorded batch)."""
        return ComputeSpec(
            device="cuda" if self.device == "cuda" else "cpu",
            cpu_threads=self.threads or 1,
            batch_invariant=batch_size == 1 and not self.batch_bucket,
            batch_size=self.batch_bucket or batch_size,
            fuse_qkv=self.fused_qkv,
            channels_last=self.channels_last,
            compile=self.compiled,
            compile_mode=self.compile_mode,
            fp8=self.fp8,
            fp8_fast_accum=self.fp8_fast_accum,
            attention=self.attention,
            vae_tiling_above=self.vae_tiling_above,
        )


# The catalog column's type, made from the dataclass: a new setting is one field above.
ACCELERATOR_SETTINGS_TYPE = pa.struct([(f.name, _ARROW[str(f.type)]) for f in fields(AcceleratorSettings)])
