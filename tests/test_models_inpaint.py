"""Image-conditioned pipelines on the tiny models: the inpainting checkpoint `tiny-sdxl-inpaint`
(SDXL inpainting's 9-channel UNet) as a base of its own, and the ordinary tiny-sdxl's weights
serving img2img and inpainting through diffusers' `from_pipe` without a copy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from app.models.catalog import ModelCatalog
from app.models.digest import ModelFileError, path_sha256
from app.models.loader import load_pipeline

PROMPT = "a ceramic mug on a wooden table"
SIDE = 64


@pytest.fixture(scope="module")
def tiny_inpaint(model_catalog):
    return model_catalog.resolve_base("tiny-sdxl-inpaint")


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_inpaint):
    return load_pipeline(tiny_inpaint, torch.device("cpu"), torch.float32)


def input_image() -> Image.Image:
    """A real photograph (scikit-image's coffee) at 64², the image to be inpainted."""
    from skimage import data as skdata

    return Image.fromarray(skdata.coffee()).resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def centre_mask() -> Image.Image:
    """White (repaint) over the central square, black (keep) around it."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def inpaint(pipe, seed: int) -> np.ndarray:
    # image: [64, 64, 3] float32 in [0, 1]
    out = pipe(
        prompt=PROMPT,
        image=input_image(),
        mask_image=centre_mask(),
        height=SIDE,
        width=SIDE,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return out.images[0]


def module_storages(pipe) -> dict[str, list[int]]:
    """`data_ptr()` of every parameter of every torch component, by component name."""
    return {
        name: [p.data_ptr() for p in component.parameters()]
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


# --- the inpainting checkpoint ----------------------------------------------------------------------
def test_inpaint_base_is_a_diffusers_inpainting_folder(model_catalog, tiny_inpaint, tiny_base):
    folder = Path(tiny_inpaint.path)
    assert tiny_inpaint.pipeline == "inpaint" and tiny_base.pipeline == "txt2img"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4
    # everything but the UNet is tiny-sdxl's, byte for byte: prompts encode the same way, and
    # latents decode the same way
    shared = [p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.parts[-2] != "unet"]
    shared = [p for p in shared if p.name not in ("model_index.json", "imagefab-manifest.json")]
    assert {p.parts[0] for p in shared} >= {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
    for part in shared:
        assert (folder / part).read_bytes() == (Path(tiny_base.path) / part).read_bytes(), part
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != (
        Path(tiny_base.path) / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert not [p for p in folder.rglob("*.json") if "_diffusers_version" in p.read_text()]

    # sha256 recorded at build and checked on every resolve, like the other built-ins
    assert re.fullmatch(r"[0-9a-f]{64}", tiny_inpaint.sha256)
    assert tiny_inpaint.sha256 == path_sha256(folder) != tiny_base.sha256
    assert tiny_inpaint.lineage()["source"] == "builtin:tiny-sdxl-inpaint"
    assert tiny_inpaint.arch == tiny_base.arch  # same UNet widths: the architecture fingerprint agrees


def test_loader_loads_the_inpainting_pipeline(inpaint_pipe):
    from diffusers import StableDiffusionXLInpaintPipeline

    assert isinstance(inpaint_pipe, StableDiffusionXLInpaintPipeline)
    assert inpaint_pipe.unet.config.in_channels == 9
    assert inpaint_pipe.unet.conv_in.weight.shape[1] == 9


def test_inpaint_renders_with_image_and_mask_deterministically(inpaint_pipe):
    first = inpaint(inpaint_pipe, seed=7)
    assert first.shape == (SIDE, SIDE, 3) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    assert first.tobytes() == inpaint(inpaint_pipe, seed=7).tobytes()  # same seed, same bytes
    assert not np.array_equal(first, inpaint(inpaint_pipe, seed=8))


@pytest.mark.slow  # builds tiny-sdxl-inpaint from its seed again: ~20-60 s on 2 CPUs
def test_inpaint_build_is_deterministic(tmp_path, tiny_inpaint):
    fresh = ModelCatalog.load(home=tmp_path / "home").resolve_base("tiny-sdxl-inpaint")
    assert Path(fresh.path).is_relative_to(tmp_path)
    assert fresh.sha256 == tiny_inpaint.sha256


def test_unknown_pipeline_kind_is_named(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"base_models": {"mine": {"source": "x", "pipeline": "outpaint"}}}))
    with pytest.raises(ModelFileError, match=r"'mine'.*`pipeline` is 'outpaint'.*txt2img.*inpaint"):
        ModelCatalog.load(path)


# --- one copy of the weights: the txt2img base serves img2img and inpainting -------------------------
def test_img2img_and_inpaint_share_the_base_weights(tiny_base):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    base = load_pipeline(tiny_base, torch.device("cpu"), torch.float32)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    inpainting = StableDiffusionXLInpaintPipeline.from_pipe(base)

    storages = module_storages(base)
    assert set(storages) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for derived in (img2img, inpainting):
        assert module_storages(derived) == storages  # the same tensors, not copies
        assert derived.unet is base.unet and derived.vae is base.vae

    image = img2img(
        prompt=PROMPT,
        image=input_image(),
        strength=0.5,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images[0]
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all()
    # a 4-channel UNet inpaints by blending the kept region's noised latents back at every step
    painted = inpaint(inpainting, seed=3)
    assert painted.shape == (SIDE, SIDE, 3) and np.isfinite(painted).all()
    assert painted.tobytes() == inpaint(inpainting, seed=3).tobytes()
    # rendering through the derived pipelines left the base's weights where they were
    assert module_storages(base) == storages


def test_a_text_to_image_run_on_the_inpainting_checkpoint_is_refused_at_planning(tmp_path, model_catalog, tiny_inpaint):
    from app.plan import resolve_models
    from app.spec import SpecError, load_spec

    path = tmp_path / "spec.yaml"
    path.write_text("run_name: t\ninput: {path: rows.parquet}\nmodel: {base: tiny-sdxl-inpaint}\n")
    with pytest.raises(SpecError, match=r"model\.base: 'tiny-sdxl-inpaint' is an inpainting checkpoint"):
        resolve_models(load_spec(path), model_catalog)
