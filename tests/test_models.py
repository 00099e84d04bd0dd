"""The model catalog and loader on real files.

Built-in tiny models come from the shared test home (built once per checkout). Anything this file
corrupts, deletes or rebuilds is a copy under `tmp_path`, pointed at by a user catalog or a copied
model home, so the shared home stays intact for every other test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ldm_export import config_only_copy, export_ldm_checkpoint, ldm_state_dict

from app.models.catalog import WEIGHT_SUFFIXES, ModelCatalog, UnknownModelError
from app.models.digest import ModelFileError, file_sha256

PROMPT = "a lighthouse on a cliff at dusk"
COMPONENTS_WITH_WEIGHTS = {"unet", "vae", "text_encoder", "text_encoder_2"}


# --- helpers ---------------------------------------------------------------------------------------
def write_catalog(folder: Path, base_models: dict | None = None, loras: dict | None = None) -> Path:
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"base_models": base_models or {}, "loras": loras or {}}))
    return path


def flip_byte(path: Path) -> None:
    """Corrupt one byte in the middle of the file: inside tensor data, so it still parses."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def render(pipe) -> np.ndarray:
    # image: [64, 64, 3] float32 in [0, 1]
    generator = torch.Generator("cpu").manual_seed(1234)
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
    return out.images[0]


def unet_adapters(pipe) -> list[str]:
    return sorted(pipe.get_list_adapters().get("unet", []))


def load_cpu(base):
    from app.models.loader import load_pipeline

    return load_pipeline(base, torch.device("cpu"), torch.float32)


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def pipe(tiny_base):
    """A fresh tiny-sdxl pipeline per test: LoRA tests change its adapters."""
    return load_cpu(tiny_base)


@pytest.fixture(scope="module")
def base_image(tiny_base):
    return render(load_cpu(tiny_base))


@pytest.fixture
def copied_base(tmp_path, tiny_base):
    """A copy of tiny-sdxl, registered in a user catalog with the built-in's sha256."""
    copy = Path(shutil.copytree(tiny_base.path, tmp_path / "tiny-copy"))
    catalog = write_catalog(tmp_path, base_models={"tiny-copy": {"source": "tiny-copy", "sha256": tiny_base.sha256}})
    return ModelCatalog.load(catalog), copy


@pytest.fixture(scope="module")
def other_arch_catalog(tmp_path_factory):
    """A base of another UNet architecture (narrower blocks) and a LoRA made for it."""
    from diffusers import UNet2DConditionModel

    from app.models import tiny

    root = tmp_path_factory.mktemp("other-arch")
    torch.manual_seed(5)
    unet = UNet2DConditionModel(**{**tiny.TINY_UNET, "block_out_channels": (16, 32)})
    unet.save_pretrained(root / "narrow-sdxl" / "unet", safe_serialization=True)
    tiny.build_tiny_lora(root / "narrow-style", root / "narrow-sdxl", tiny.TinyLoraRecipe(rank=4, seed=3))
    return write_catalog(
        root,
        base_models={"narrow-sdxl": {"source": "narrow-sdxl"}},
        loras={"narrow-style": {"source": "narrow-style", "base": "narrow-sdxl"}},
    )


# --- 1. built-in models --------------------------------------------------------------------------
def test_builtin_base_is_a_checked_safetensors_folder(model_catalog, tiny_base):
    assert tiny_base.kind == "base"
    assert re.fullmatch(r"[0-9a-f]{64}", tiny_base.sha256)
    folder = Path(tiny_base.path)
    assert (folder / "model_index.json").is_file()
    weights = [p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    assert {p.suffix for p in weights} == {".safetensors"}
    assert {p.parent.name for p in weights} == COMPONENTS_WITH_WEIGHTS

    # No library versions in its configs: the same seed gives the same bytes (and image ids)
    # under any transformers/diffusers the pins allow.
    configs = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*.json")}
    assert "unet/config.json" in configs and "text_encoder/config.json" in configs
    assert not [
        name for name, text in configs.items() if "_diffusers_version" in text or "transformers_version" in text
    ]

    again = model_catalog.resolve_base("tiny-sdxl")
    assert (again.path, again.sha256) == (tiny_base.path, tiny_base.sha256)
    assert again.lineage() == {
        "name": "tiny-sdxl",
        "version": "1",
        "sha256": tiny_base.sha256,
        "source": "builtin:tiny-sdxl",
    }


def test_builtin_loras_resolve_with_their_weight_file(tiny_base, tiny_loras):
    for name, lora in tiny_loras.items():
        assert (lora.name, lora.kind) == (name, "lora")
        assert lora.weight_name == "pytorch_lora_weights.safetensors"
        assert (Path(lora.path) / lora.weight_name).is_file()
        assert re.fullmatch(r"[0-9a-f]{64}", lora.sha256)
        assert lora.arch == tiny_base.arch
    assert tiny_loras["tiny-style"].sha256 != tiny_loras["tiny-detail"].sha256


@pytest.mark.slow  # builds tiny-sdxl from its seed again: ~7 s on 2 CPUs
def test_builtin_build_is_deterministic(tmp_path, tiny_base, tiny_loras):
    fresh = ModelCatalog.load(home=tmp_path / "home")
    base = fresh.resolve_base("tiny-sdxl")
    assert Path(base.path).is_relative_to(tmp_path)
    assert base.sha256 == tiny_base.sha256
    assert fresh.resolve_lora("tiny-style", base).sha256 == tiny_loras["tiny-style"].sha256


# --- 2. corrupt and missing files ----------------------------------------------------------------
def test_user_catalog_copy_with_expected_sha256_resolves(copied_base, tiny_base):
    catalog, copy = copied_base
    resolved = catalog.resolve_base("tiny-copy")  # a relative source is relative to the catalog file
    assert (resolved.path, resolved.sha256, resolved.arch) == (str(copy), tiny_base.sha256, tiny_base.arch)


def test_flipped_byte_names_the_file(copied_base):
    catalog, copy = copied_base
    bad = copy / "unet" / "diffusion_pytorch_model.safetensors"
    flip_byte(bad)
    with pytest.raises(ModelFileError) as e:
        catalog.resolve_base("tiny-copy")
    assert str(bad) in str(e.value)
    assert "sha256 mismatch" in str(e.value)


def test_deleted_file_names_the_file(copied_base):
    catalog, copy = copied_base
    gone = copy / "vae" / "diffusion_pytorch_model.safetensors"
    gone.unlink()
    with pytest.raises(ModelFileError, match="file is missing") as e:
        catalog.resolve_base("tiny-copy")
    assert str(gone) in str(e.value)


def test_corrupted_builtin_in_a_copied_home_names_the_file(tmp_path, model_catalog, tiny_base):
    home = tmp_path / "home"
    # Leading-dot folders are builds in progress (see _build_if_missing): not part of the home.
    shutil.copytree(Path(tiny_base.path).parent, home / "models", ignore=shutil.ignore_patterns(".*"))
    bad = home / "models" / Path(tiny_base.path).name / "unet" / "diffusion_pytorch_model.safetensors"
    flip_byte(bad)
    with pytest.raises(ModelFileError) as e:
        ModelCatalog.load(home=home).resolve_base("tiny-sdxl")
    assert str(bad) in str(e.value)
    assert "sha256 mismatch" in str(e.value)
    assert model_catalog.resolve_base("tiny-sdxl").sha256 == tiny_base.sha256  # the shared home is untouched


# --- 3. names, paths and catalog entries ---------------------------------------------------------
def test_missing_path_names_the_path(tmp_path):
    catalog = ModelCatalog.load(write_catalog(tmp_path, base_models={"gone": {"source": "not-here"}}))
    with pytest.raises(ModelFileError, match="model 'gone' not found") as e:
        catalog.resolve_base("gone")
    assert str(tmp_path / "not-here") in str(e.value)


def test_unknown_name_lists_the_known_names(model_catalog):
    with pytest.raises(UnknownModelError) as e:
        model_catalog.resolve_base("sdxl-turbo")
    message = str(e.value)
    assert "unknown base model 'sdxl-turbo'" in message
    for known in ("tiny-sdxl", "tiny-sdxl-b", "sdxl-base-1.0"):
        assert known in message
    # A LoRA name is not a base model, and the other way round.
    with pytest.raises(UnknownModelError, match=r"unknown LoRA 'tiny-sdxl' \(known: .*tiny-style"):
        model_catalog.resolve_lora("tiny-sdxl")


def test_user_catalog_entry_with_an_unknown_field_is_named(tmp_path):
    path = write_catalog(tmp_path, base_models={"mine": {"source": "x", "precision": "fp16"}})
    with pytest.raises(ModelFileError, match=r"base_models\.mine: unknown field\(s\) \['precision'\]") as e:
        ModelCatalog.load(path)
    assert str(path) in str(e.value)


def test_user_catalog_entry_without_source_is_named(tmp_path):
    path = write_catalog(tmp_path, loras={"mine": {"base": "tiny-sdxl"}})
    with pytest.raises(ModelFileError, match=r"loras\.mine: needs at least a `source`") as e:
        ModelCatalog.load(path)
    assert str(path) in str(e.value)


def test_lora_entry_without_base_is_named(tmp_path, tiny_loras):
    catalog = ModelCatalog.load(write_catalog(tmp_path, loras={"orphan": {"source": tiny_loras["tiny-style"].path}}))
    with pytest.raises(ModelFileError, match=r"LoRA 'orphan': the catalog entry names no `base`"):
        catalog.resolve_lora("orphan")


# --- 4. safetensors only -------------------------------------------------------------------------
def test_folder_with_only_a_bin_file_is_refused(tmp_path):
    lora = tmp_path / "old-lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.bin").write_bytes(b"pickle bytes are never read")
    catalog = ModelCatalog.load(write_catalog(tmp_path, loras={"old": {"source": "old-lora", "base": "tiny-sdxl"}}))
    with pytest.raises(ModelFileError, match="pickle-based checkpoints are refused") as e:
        catalog.resolve_lora("old")
    assert str(lora / "pytorch_lora_weights.bin") in str(e.value)


def test_ckpt_file_source_is_refused(tmp_path, tiny_base):
    ckpt = tmp_path / "sd_xl_base.ckpt"
    ckpt.write_bytes(b"pickle bytes are never read")
    path = write_catalog(tmp_path, base_models={"old": {"source": f"file:{ckpt}", "config": tiny_base.path}})
    with pytest.raises(ModelFileError, match="pickle-based checkpoints are refused") as e:
        ModelCatalog.load(path).resolve_base("old")
    assert str(ckpt) in str(e.value)


def test_component_with_only_pickle_weights_is_refused_at_resolve(copied_base):
    # Other components still have safetensors; the UNet would only fail later, when a worker loads it.
    catalog, copy = copied_base
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    with pytest.raises(ModelFileError, match="pickle-based checkpoints are refused") as e:
        catalog.resolve_base("tiny-copy")
    assert str(unet.with_suffix(".bin")) in str(e.value)


def test_pickles_beside_safetensors_are_allowed(copied_base, tiny_base):
    # Hub folders often ship both formats; use_safetensors=True loads only the safetensors.
    _, copy = copied_base
    (copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle bytes are never read")
    catalog = ModelCatalog.load(write_catalog(copy.parent, base_models={"tiny-copy": {"source": "tiny-copy"}}))
    assert catalog.resolve_base("tiny-copy").arch == tiny_base.arch


# --- 5. LoRA / base architecture -----------------------------------------------------------------
def test_lora_for_another_architecture_is_refused_at_resolve(other_arch_catalog, tiny_base):
    catalog = ModelCatalog.load(other_arch_catalog)
    with pytest.raises(ModelFileError) as e:
        catalog.resolve_lora("narrow-style", tiny_base)
    message = str(e.value)
    assert "LoRA 'narrow-style'" in message
    assert "base 'narrow-sdxl'" in message and "base 'tiny-sdxl'" in message
    assert catalog.resolve_base("narrow-sdxl").arch in message and tiny_base.arch in message


def test_loading_a_mismatched_lora_fails_cleanly(other_arch_catalog, pipe, base_image, tiny_loras):
    from app.models.loader import LoraStackSwitcher, adapter_name

    mismatched = ModelCatalog.load(other_arch_catalog).resolve_lora("narrow-style")  # checked against its own base
    switcher = LoraStackSwitcher()
    with pytest.raises(ModelFileError, match="cannot load LoRA 'narrow-style' into this base") as e:
        switcher.apply(pipe, [(mismatched, 1.0)])
    assert mismatched.path in str(e.value)
    assert adapter_name(mismatched) not in unet_adapters(pipe)
    assert (switcher.active, len(switcher.loaded), switcher.switches) == ((), 0, 0)
    np.testing.assert_array_equal(render(pipe), base_image)

    # With a stack active, a failed load leaves that stack in place.
    style = tiny_loras["tiny-style"]
    switcher.apply(pipe, [(style, 0.8)])
    styled = render(pipe)
    with pytest.raises(ModelFileError):
        switcher.apply(pipe, [(mismatched, 1.0)])
    assert unet_adapters(pipe) == [adapter_name(style)]
    np.testing.assert_array_equal(render(pipe), styled)
    switcher.apply(pipe, [])
    np.testing.assert_array_equal(render(pipe), base_image)


# --- 6. switching LoRA stacks on a loaded pipeline ------------------------------------------------
def test_lora_weights_and_empty_stack(pipe, base_image, tiny_loras):
    from app.models.loader import LoraStackSwitcher

    style = tiny_loras["tiny-style"]
    switcher = LoraStackSwitcher()
    switcher.apply(pipe, [(style, 0.0)])
    np.testing.assert_array_equal(render(pipe), base_image)
    switcher.apply(pipe, [(style, 0.8)])
    assert np.abs(render(pipe) - base_image).max() > 0.05
    switcher.apply(pipe, [])
    np.testing.assert_array_equal(render(pipe), base_image)
    assert switcher.switches == 3
    switcher.apply(pipe, [])  # the stack already active: nothing to do
    assert switcher.switches == 3


def test_max_loaded_deletes_the_least_recently_used_adapter(pipe, tiny_loras):
    from app.models.loader import LoraStackSwitcher, adapter_name

    style, detail = tiny_loras["tiny-style"], tiny_loras["tiny-detail"]
    switcher = LoraStackSwitcher(max_loaded=1)
    switcher.apply(pipe, [(style, 0.8)])
    styled = render(pipe)
    assert unet_adapters(pipe) == [adapter_name(style)]
    switcher.apply(pipe, [(detail, 0.8)])
    assert unet_adapters(pipe) == [adapter_name(detail)]
    assert list(switcher.loaded) == [adapter_name(detail)]
    switcher.apply(pipe, [(style, 0.8)])  # loaded again from disk: the same image as before
    np.testing.assert_array_equal(render(pipe), styled)
    # Adapters in the active stack are never deleted, even past max_loaded.
    switcher.apply(pipe, [(style, 0.5), (detail, 0.5)])
    assert unet_adapters(pipe) == sorted([adapter_name(style), adapter_name(detail)])
    assert switcher.switches == 4


# --- 7. a LoRA as a single .safetensors file -----------------------------------------------------
def test_single_file_lora_resolves_and_loads(tmp_path, pipe, tiny_base, tiny_loras):
    from app.models.loader import LoraStackSwitcher

    style = tiny_loras["tiny-style"]
    single = tmp_path / "style" / "pytorch_lora_weights.safetensors"
    single.parent.mkdir()
    shutil.copyfile(Path(style.path) / style.weight_name, single)
    entry = {"source": f"file:{single}", "base": "tiny-sdxl", "sha256": file_sha256(single)}
    catalog = ModelCatalog.load(write_catalog(tmp_path, loras={"style-file": entry}))
    lora = catalog.resolve_lora("style-file", tiny_base)
    assert (lora.path, lora.weight_name, lora.sha256) == (str(single), None, file_sha256(single))

    switcher = LoraStackSwitcher()
    switcher.apply(pipe, [(lora, 0.8)])
    from_file = render(pipe)
    switcher.apply(pipe, [(style, 0.8)])  # the same weights from the built-in folder
    np.testing.assert_array_equal(render(pipe), from_file)


def test_single_file_with_wrong_sha256_names_the_file(tmp_path, tiny_loras):
    style = tiny_loras["tiny-style"]
    single = Path(shutil.copyfile(Path(style.path) / style.weight_name, tmp_path / "style.safetensors"))
    entry = {"source": f"file:{single}", "base": "tiny-sdxl", "sha256": "0" * 64}
    catalog = ModelCatalog.load(write_catalog(tmp_path, loras={"style-file": entry}))
    with pytest.raises(ModelFileError, match="sha256 mismatch") as e:
        catalog.resolve_lora("style-file")
    assert str(single) in str(e.value)


# --- B. single-file base checkpoints in the original (LDM) layout ---------------------------------
def test_ldm_export_is_what_diffusers_converts_back(tiny_base):
    """The exporter is the exact inverse of diffusers' single-file key conversions."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(tiny_base.path)
    ldm = ldm_state_dict(folder)
    config = {c: json.loads((folder / c / "config.json").read_text()) for c in ("unet", "vae")}
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    back = {
        "unet/diffusion_pytorch_model": sfu.convert_ldm_unet_checkpoint(ldm, config["unet"]),
        "vae/diffusion_pytorch_model": sfu.convert_ldm_vae_checkpoint(ldm, config["vae"]),
        # transformers >= 5.6 saves CLIPTextModel without its `text_model.` wrapper
        "text_encoder/model": {
            k.removeprefix("text_model."): v
            for k, v in sfu.convert_ldm_clip_checkpoint(ldm).items()
            if not k.startswith("conditioner.")
        },
        "text_encoder_2/model": sfu.convert_open_clip_checkpoint(text_2, ldm, prefix="conditioner.embedders.1.model."),
    }
    for stem, converted in back.items():
        original = load_file(folder / f"{stem}.safetensors")
        assert set(converted) == set(original), stem
        for key, tensor in original.items():
            assert torch.equal(converted[key], tensor), f"{stem}: {key}"


def test_single_file_base_matches_folder(tmp_path, tiny_base):
    checkpoint = export_ldm_checkpoint(Path(tiny_base.path), tmp_path / "tiny-sdxl.safetensors")
    # Configs only: a component missing from the checkpoint cannot be read from the folder instead.
    configs = config_only_copy(Path(tiny_base.path), tmp_path / "tiny-sdxl-configs")
    single = {"source": f"file:{checkpoint.name}", "config": configs.name, "sha256": file_sha256(checkpoint)}
    path = write_catalog(tmp_path, base_models={"tiny-file": single, "tiny-folder": {"source": tiny_base.path}})
    catalog = ModelCatalog.load(path)
    from_file, from_folder = catalog.resolve_base("tiny-file"), catalog.resolve_base("tiny-folder")
    assert (from_file.path, from_file.config) == (str(checkpoint), str(configs))
    assert from_file.arch == from_folder.arch

    image_file, image_folder = render(load_cpu(from_file)), render(load_cpu(from_folder))
    # The weights are bit-identical, but not the images: from_pretrained keeps tensors in the
    # memory-mapped file, where text_projection starts off a 64-byte boundary, and the CPU matmul
    # then rounds the pooled embedding differently in the last bit (the image moves by ~1e-6).
    np.testing.assert_allclose(image_file, image_folder, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["../../etc/evil", "a/b", "..hidden", "", "x" * 200])
def test_model_names_can_never_be_paths(tmp_path, name):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"loras": {name: {"source": "builtin:tiny-lora", "base": "tiny-sdxl"}}}))
    with pytest.raises(ModelFileError, match="a model name is letters"):
        ModelCatalog.load(path)


def test_model_versions_can_never_be_paths(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(
        yaml.safe_dump({"loras": {"ok": {"source": "builtin:tiny-lora", "base": "tiny-sdxl", "version": "../../x"}}})
    )
    with pytest.raises(ModelFileError, match="is not a version"):
        ModelCatalog.load(path)
