"""Test fixture: one diffusers SDXL folder written as a single checkpoint in the original (LDM) layout.

Released SDXL single-file checkpoints (`sd_xl_base_1.0.safetensors` and the fine-tunes built on it)
keep the key layout of Stability's training code: the UNet under `model.diffusion_model.`, the VAE
under `first_stage_model.`, the CLIP ViT-L text encoder (Hugging Face layout) under
`conditioner.embedders.0.transformer.` and the OpenCLIP ViT-bigG text encoder (OpenCLIP layout)
under `conditioner.embedders.1.model.`. diffusers reads them with `from_single_file`, renaming keys
in `diffusers/loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`).
This module is the inverse of those renames, so the tiny SDXL can stand in for a released
checkpoint. Only the parts the tiny SDXL uses are covered; an unknown key raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers module name -> LDM module name, for layers outside the down/mid/up blocks.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time ("addition") embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_TOP_LEVEL = {
    "conv_norm_out": "norm_out",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class LdmExportError(ValueError):
    """A diffusers key this exporter has no LDM name for."""


def _split(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")  # "conv1.weight" -> ("conv1", "weight")
    return module, param


def unet_to_ldm(state: dict, config: dict) -> dict:
    """The UNet's diffusers state dict renamed to SDXL's `model.diffusion_model.` layout."""
    per_level = config["layers_per_block"] + 1  # LDM counts each level's resnets plus its down/upsampler
    up_has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
            level, part, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            if part == "downsamplers":  # "conv.weight" -> input_blocks.N.0.op.weight
                new = f"input_blocks.{1 + level * per_level + per_level - 1}.0.op.{_split(rest)[1]}"
            elif part == "resnets":
                module, param = _split(rest)
                new = f"input_blocks.{1 + level * per_level + i}.0.{UNET_RESNET[module]}.{param}"
            else:
                new = f"input_blocks.{1 + level * per_level + i}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
            level, part, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            if part == "upsamplers":  # after the level's last resnet, and after its attention if any
                slot = 2 if up_has_attention[level] else 1
                new = f"output_blocks.{level * per_level + per_level - 1}.{slot}.{rest}"
            elif part == "resnets":
                module, param = _split(rest)
                new = f"output_blocks.{level * per_level + i}.0.{UNET_RESNET[module]}.{param}"
            else:
                new = f"output_blocks.{level * per_level + i}.1.{rest}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            part, i, rest = m[1], int(m[2]), m[3]
            if part == "resnets":  # middle_block: resnet 0, attention 1, resnet 2
                module, param = _split(rest)
                new = f"middle_block.{2 * i}.{UNET_RESNET[module]}.{param}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            module, param = _split(key)
            if module not in UNET_TOP_LEVEL:
                raise LdmExportError(f"unet key '{key}' has no LDM name in this exporter")
            new = f"{UNET_TOP_LEVEL[module]}.{param}"
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """The VAE's diffusers state dict renamed to SDXL's `first_stage_model.` layout."""
    levels = len(config["up_block_types"])
    out = {}
    for key, tensor in state.items():
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            module, param = _split(m[3])
            new = f"encoder.down.{m[1]}.block.{m[2]}.{VAE_RESNET.get(module, module)}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # LDM numbers the decoder levels from the latent end: diffusers' up_blocks.0 is up.{levels-1}
            module, param = _split(m[3])
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{VAE_RESNET.get(module, module)}.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            module, param = _split(m[2])
            if module not in VAE_ATTENTION:
                raise LdmExportError(f"vae key '{key}' has no LDM name in this exporter")
            if module != "group_norm" and param == "weight":
                tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[module]}.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key):
            new = f"{m[1]}.{VAE_TOP_LEVEL.get(m[2], m[2])}.{m[3]}"
        elif re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
            new = key
        else:
            raise LdmExportError(f"vae key '{key}' has no LDM name in this exporter")
        out[VAE_PREFIX + new] = tensor
    return out


def clip_to_ldm(state: dict) -> dict:
    """CLIP ViT-L stays in the Hugging Face layout, under `conditioner.embedders.0.transformer.text_model.`."""
    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` wrapper; SDXL files keep it.
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def open_clip_to_ldm(state: dict) -> dict:
    """CLIPTextModelWithProjection in OpenCLIP's layout, under `conditioner.embedders.1.model.`."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        # OpenCLIP multiplies by the projection (x @ P); a Linear stores P transposed.
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            # OpenCLIP's attention is torch's MultiheadAttention: q, k and v in one in_proj.
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{param}") for p in ("q", "k", "v")]
            )
            for hf, oc in OPEN_CLIP_LAYER.items():
                out[f"{dst}{oc}.{param}"] = state.pop(f"{src}{hf}.{param}")
    leftover = sorted(k for k in state if k != "embeddings.position_ids")
    if leftover:
        raise LdmExportError(f"text_encoder_2 keys with no OpenCLIP name in this exporter: {leftover}")
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def ldm_state_dict(folder: Path) -> dict:
    """Every weight of the diffusers SDXL pipeline folder `folder`, under its LDM checkpoint name."""
    from safetensors.torch import load_file

    folder = Path(folder)

    def weights(component: str, file: str) -> dict:
        return load_file(folder / component / file)

    def config(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    state = {}
    state.update(unet_to_ldm(weights("unet", "diffusion_pytorch_model.safetensors"), config("unet")))
    state.update(vae_to_ldm(weights("vae", "diffusion_pytorch_model.safetensors"), config("vae")))
    state.update(clip_to_ldm(weights("text_encoder", "model.safetensors")))
    state.update(open_clip_to_ldm(weights("text_encoder_2", "model.safetensors")))
    return state


def export_ldm_checkpoint(folder: Path, dest: Path) -> Path:
    """Write the SDXL pipeline folder `folder` as one LDM-layout safetensors file at `dest`."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ldm_state_dict(folder).items()}, dest)
    return dest


def config_only_copy(folder: Path, dest: Path) -> Path:
    """A copy of the pipeline folder without its weights: what `from_single_file(config=...)` needs.

    Without weights in the config folder, `from_single_file` cannot quietly fall back to them
    for a component it fails to find in the checkpoint.
    """
    import shutil

    weights = shutil.ignore_patterns("*.safetensors", "*.bin", "imagefab-manifest.json")
    return Path(shutil.copytree(folder, dest, ignore=weights))
