"""The model catalog: base models and LoRAs by name, where their files are, and their sha256.

`ModelCatalog` reads the built-in catalog (catalog.yaml beside this file) and, optionally, a
user catalog merged over it. `resolve_base` / `resolve_lora` turn a name into a `ResolvedModel`:
a local path whose bytes were checked against the expected sha256. Built-in tiny models are
built into the model home the first time they are resolved. Resolution happens on the driver
before any GPU work, so a missing or corrupt file stops a job before it starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from app.models.digest import (
    ModelFileError,
    path_sha256,
    read_manifest,
    verify_file,
    verify_folder,
    write_manifest,
)

# Bumped when the tiny builders change, so stale builds are not mistaken for current ones.
TINY_BUILD_VERSION = "3"  # 3: library versions dropped from the configs
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")
MODEL_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a base model's checkpoint is for: "txt2img" (SDXL base: its components also serve img2img
# and inpainting through diffusers' `from_pipe`) or "inpaint" (an inpainting checkpoint, whose UNet
# reads the mask and the masked image: 9 input channels).
BASE_PIPELINES = ("txt2img", "inpaint")


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    """One catalog entry, as written in a catalog YAML."""

    name: str
    kind: str  # "base" | "lora"
    source: str
    version: str = "1"
    sha256: str | None = None
    base: str | None = None  # LoRAs: the base model they were trained for
    config: str | None = None  # single-file bases: a diffusers folder holding the configs
    arch: str | None = None
    dtype: str = "auto"
    seed: int = 0
    rank: int = 4
    pipeline: str = "txt2img"  # bases: one of BASE_PIPELINES
    description: str = ""
    licence: str = ""  # the model's licence, recorded in every image's usage rights and C2PA manifest

    def __post_init__(self) -> None:
        if self.pipeline not in BASE_PIPELINES:
            raise ModelFileError(
                f"model '{self.name}': `pipeline` is {self.pipeline!r}; valid values are {list(BASE_PIPELINES)}"
            )

    @property
    def source_kind(self) -> str:
        if self.source.startswith("builtin:"):
            return "builtin"
        if self.source.startswith("hub:"):
            return "hub"
        if self.source.startswith("file:") or self.source.endswith(".safetensors"):
            return "single_file"
        return "folder"


@dataclass(frozen=True)
class ResolvedModel:
    """A catalog entry bound to checked local files: what generators load and catalog rows cite."""

    name: str
    kind: str
    version: str
    source: str
    path: str  # local folder or file
    sha256: str
    arch: str
    dtype: str = "auto"
    config: str | None = None
    weight_name: str | None = None  # LoRA file inside a folder
    pipeline: str = "txt2img"  # bases: what the checkpoint is for (see BASE_PIPELINES)

    def lineage(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "source": self.source}


def default_home() -> Path:
    """Where built-in models are built: $IMAGEFAB_HOME, else ~/.cache/imagefab."""
    return Path(os.environ.get("IMAGEFAB_HOME") or Path.home() / ".cache" / "imagefab")


@dataclass(frozen=True)
class ModelCatalog:
    entries: dict[str, ModelEntry] = field(default_factory=dict)
    home: str = ""
    origin: str = "built-in"

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, user_catalog: str | Path | None = None, home: str | Path | None = None) -> ModelCatalog:
        text = resources.files("app.models").joinpath("catalog.yaml").read_text()
        entries = _parse_catalog(yaml.safe_load(text), "app/models/catalog.yaml", Path.cwd())
        origin = "built-in"
        if user_catalog:
            path = Path(user_catalog)
            try:
                data = yaml.safe_load(path.read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ModelFileError(f"{path}: cannot read model catalog ({e})") from e
            entries.update(_parse_catalog(data, str(path), path.parent))
            origin = f"built-in + {path}"
        return cls(entries=entries, home=str(Path(home) if home else default_home()), origin=origin)

    def licences(self) -> dict[str, str]:
        """Model name -> licence, for every model of the catalog that names one."""
        return {name: e.licence for name, e in self.entries.items() if e.licence}

    def names(self, kind: str) -> list[str]:
        return sorted(n for n, e in self.entries.items() if e.kind == kind)

    def entry(self, name: str, kind: str) -> ModelEntry:
        e = self.entries.get(name)
        if e is None or e.kind != kind:
            what = "base model" if kind == "base" else "LoRA"
            raise UnknownModelError(f"unknown {what} '{name}' (known: {', '.join(self.names(kind))})")
        return e

    # --- resolving -----------------------------------------------------------------------------
    def resolve_base(self, name: str) -> ResolvedModel:
        e = self.entry(name, "base")
        path = self._materialise(e)
        arch = e.arch or _folder_arch(Path(e.config) if e.source_kind == "single_file" and e.config else path)
        return ResolvedModel(
            name=e.name,
            kind="base",
            version=e.version,
            source=e.source,
            path=str(path),
            sha256=self._check(e, path),
            arch=arch,
            dtype=e.dtype,
            config=e.config,
            pipeline=e.pipeline,
        )

    def resolve_lora(self, name: str, base: ResolvedModel | None = None) -> ResolvedModel:
        e = self.entry(name, "lora")
        if e.base is None:
            raise ModelFileError(f"LoRA '{name}': the catalog entry names no `base` model")
        trained_for = self.resolve_base(e.base) if base is None or base.name != e.base else base
        if base is not None and trained_for.arch != base.arch:
            raise ModelFileError(
                f"LoRA '{name}' was made for base '{e.base}' (architecture {trained_for.arch}), "
                f"which does not match base '{base.name}' (architecture {base.arch})"
            )
        path = self._materialise(e)
        weight = _lora_weight_file(path)
        return ResolvedModel(
            name=e.name,
            kind="lora",
            version=e.version,
            source=e.source,
            path=str(path),
            sha256=self._check(e, path),
            arch=trained_for.arch,
            weight_name=weight,
        )

    def _materialise(self, e: ModelEntry) -> Path:
        """The local path of an entry's files, building a built-in one if it is not there yet."""
        kind = e.source_kind
        if kind == "builtin":
            return self._build_if_missing(e)
        if kind == "hub":
            return _hub_snapshot(e.source.removeprefix("hub:"))
        path = Path(e.source.removeprefix("file:")).expanduser()
        if not path.exists():
            raise ModelFileError(f"{path}: model '{e.name}' not found")
        _refuse_pickles(path, e.name)
        return path

    def _check(self, e: ModelEntry, path: Path) -> str:
        if e.source_kind == "builtin":
            manifest = read_manifest(path)
            if manifest is None:
                raise ModelFileError(
                    f"{path}: built-in model '{e.name}' has no manifest; delete the folder to rebuild it"
                )
            verify_folder(path, manifest["sha256"])
            return manifest["sha256"]
        if e.sha256:
            (verify_folder if path.is_dir() else verify_file)(path, e.sha256)
            return e.sha256
        return path_sha256(path)  # no expectation given: record what was used

    def _build_if_missing(self, e: ModelEntry) -> Path:
        from app.models import tiny  # imports diffusers: only when a build is needed

        tag = f"{e.name}-v{e.version}-b{TINY_BUILD_VERSION}"
        dest = Path(self.home) / "models" / tag
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the destination and rename: concurrent builders never see a half folder.
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=dest.parent))
        try:
            if e.source == "builtin:tiny-sdxl":
                tiny.build_tiny_sdxl(tmp, seed=e.seed)
            elif e.source == "builtin:tiny-sdxl-inpaint":
                tiny.build_tiny_sdxl_inpaint(tmp, seed=e.seed)
            elif e.source == "builtin:tiny-lora":
                base_dir = Path(self.resolve_base(e.base or "").path)
                tiny.build_tiny_lora(tmp, base_dir, tiny.TinyLoraRecipe(rank=e.rank, seed=e.seed))
            else:
                raise ModelFileError(f"model '{e.name}': unknown built-in source '{e.source}'")
            write_manifest(tmp, {"name": e.name, "version": e.version, "source": e.source})
            try:
                tmp.rename(dest)
            except OSError:
                if not dest.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _parse_catalog(data: object, where: str, relative_to: Path) -> dict[str, ModelEntry]:
    if not isinstance(data, dict):
        raise ModelFileError(f"{where}: a model catalog is a mapping with `base_models` and `loras`")
    unknown = set(data) - {"base_models", "loras"}
    if unknown:
        raise ModelFileError(f"{where}: unknown section(s) {sorted(unknown)}; expected base_models, loras")
    entries: dict[str, ModelEntry] = {}
    allowed = set(ModelEntry.__dataclass_fields__) - {"name", "kind"}
    for section, kind in (("base_models", "base"), ("loras", "lora")):
        for name, body in (data.get(section) or {}).items():
            if not MODEL_NAME.match(str(name)):
                # Names become folder names in the model home and adapter names: never paths.
                raise ModelFileError(
                    f"{where}: {section}.{name!r}: a model name is letters, digits, '.', '_', '-' "
                    f"(at most 128, starting alphanumeric, no '..')"
                )
            if not isinstance(body, dict) or "source" not in body:
                raise ModelFileError(f"{where}: {section}.{name}: needs at least a `source`")
            bad = set(body) - allowed
            if bad:
                raise ModelFileError(f"{where}: {section}.{name}: unknown field(s) {sorted(bad)}")
            body = dict(body)
            body["version"] = str(body.get("version", "1"))
            if not MODEL_NAME.match(body["version"]):
                raise ModelFileError(
                    f"{where}: {section}.{name}.version: {body['version']!r} is not a version "
                    f"(letters, digits, '.', '_', '-')"
                )
            src = str(body["source"])
            if not src.startswith(("builtin:", "hub:")):
                # Relative paths in a user catalog are relative to the catalog file.
                raw = src.removeprefix("file:")
                p = Path(raw).expanduser()
                body["source"] = ("file:" if src.startswith("file:") else "") + str(
                    p if p.is_absolute() else relative_to / p
                )
            if body.get("config") and not Path(body["config"]).is_absolute():
                body["config"] = str(relative_to / body["config"])
            entries[str(name)] = ModelEntry(name=str(name), kind=kind, **body)
    return entries


def _refuse_pickles(path: Path, name: str) -> None:
    """Only safetensors are loaded: pickle-based checkpoints can run code when read.

    In a folder, every sub-folder that holds weights must hold safetensors ones: diffusers folders
    often ship both formats side by side (`use_safetensors=True` then reads only the safetensors),
    but a component with pickle weights alone would only fail later, on a GPU worker.
    """
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelFileError(
                f"{path}: model '{name}' is not a .safetensors file; pickle-based checkpoints are refused"
            )
        return
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    has_safetensors = {p.parent for p in weights if p.suffix == ".safetensors"}
    for p in weights:
        if p.parent not in has_safetensors:
            raise ModelFileError(
                f"{p}: model '{name}' has only pickle-based weights in {p.parent}; pickle-based checkpoints "
                f"are refused (convert them to .safetensors)"
            )


def _lora_weight_file(path: Path) -> str | None:
    if path.is_file():
        return None
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise ModelFileError(f"{path}: no .safetensors LoRA file in the folder")
    return "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in found else found[0]


def _folder_arch(path: Path) -> str:
    """A short fingerprint of the UNet's shape, so a LoRA is never loaded into another architecture."""
    cfg_path = path / "unet" / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{cfg_path}: cannot read the UNet config ({e})") from e
    keys = (
        "block_out_channels",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "attention_head_dim",
        "down_block_types",
        "layers_per_block",
    )
    import hashlib

    shape = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True)
    if cfg.get("block_out_channels") == [320, 640, 1280] and cfg.get("cross_attention_dim") == 2048:
        return "sdxl"
    return "unet-" + hashlib.sha256(shape.encode()).hexdigest()[:10]


def _hub_snapshot(repo_id: str) -> Path:
    """The local hub-cache folder of `repo_id`; this machine has no network, so it must be cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.txt", "*.safetensors"])
        )
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelFileError(
            f"hub model '{repo_id}' is not in the local hub cache; download it on a machine with internet "
            f"(huggingface-cli download {repo_id}) or point the catalog at a local folder"
        ) from e
