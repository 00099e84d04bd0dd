"""Offline tiny SDXL-architecture models, built from a seed and saved as real diffusers folders.

No weights can be downloaded here, so the project builds its own: the SDXL component classes
(two CLIP text encoders, a text_time-conditioned UNet, an 8x VAE) at tiny widths with random
weights, and the real CLIP byte-pair tokenizer built from the merges that ship inside open_clip.
They are written with `save_pretrained` / `save_lora_weights` and read back with
`from_pretrained` / `load_lora_weights`: the code path that real SDXL and its LoRAs take.

Building is deterministic: the same seed and library versions give the same files.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from app.models.library_logging import quiet_libraries

# The tiny UNet: the shapes of diffusers' own SDXL tests (two levels, text_time conditioning).
# cross_attention_dim = hidden(text_encoder) + hidden(text_encoder_2) = 32 + 48,
# projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim(te2) = 48 + 32.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=80,
    norm_num_groups=1,
)
# Four VAE levels give SDXL's 8x latent scale, so size rules (multiples of 8) are the real ones.
TINY_VAE = dict(
    block_out_channels=(16, 32, 32, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=128,
    scaling_factor=0.13025,  # SDXL's
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    hidden_act="gelu",
    projection_dim=32,
    max_position_embeddings=77,
)
# SDXL's second encoder is wider than its first (1280 vs 768); diffusers' single-file loader tells
# them apart by width, so the tiny ones differ too (48 vs 32) and tiny-sdxl loads from one file.
TINY_TEXT_2 = {**TINY_TEXT, "hidden_size": 48}
# SDXL-base's scheduler configuration.
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TinyLoraRecipe:
    """How a built-in tiny LoRA is made: its rank, seed and how strongly it moves the UNet."""

    rank: int = 4
    seed: int = 1
    init_std: float = 0.3


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP BPE vocabulary (49408 tokens), rebuilt from open_clip's merges file."""
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # The first line is a header; CLIP keeps 48894 merges.
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : 49152 - 256 - 2 + 1])]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tiny_sdxl(dest: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline folder (model_index.json + components) to `dest`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    vocab, merges = clip_vocab_and_merges()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    # SDXL's two tokenizers differ only in their padding token.
    # transformers annotates `merges` as text lines; its BPE builder takes (left, right) pairs too.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")  # type: ignore[arg-type]
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")  # type: ignore[arg-type]
    ids: dict[str, Any] = dict(vocab_size=len(vocab), bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**ids, **TINY_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **TINY_TEXT_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)  # type: ignore[attr-defined]  # diffusers mixin
    drop_library_versions(dest)
    return dest


LIBRARY_VERSION_KEYS = ("transformers_version", "_diffusers_version")


def drop_library_versions(folder: Path) -> None:
    """Remove the writing libraries' versions from the saved configs (both loaders ignore them).

    They are the only bytes that differ between builds with different transformers/diffusers
    versions (measured: transformers 5.24 and 5.23 gave two sha256 for the same weights), and the
    base's sha256 is part of every image id: without them, the same seed builds the same model on
    any machine the pins allow.
    """
    for path in sorted(folder.rglob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and any(k in data for k in LIBRARY_VERSION_KEYS):
            for key in LIBRARY_VERSION_KEYS:
                data.pop(key, None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny_lora(dest: Path, base_dir: Path, recipe: TinyLoraRecipe) -> Path:
    """Write a tiny UNet LoRA for the base at `base_dir`, in the diffusers LoRA file format."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    torch.manual_seed(recipe.seed)
    unet.add_adapter(
        LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.rank,
            init_lora_weights=False,
            target_modules=list(LORA_TARGETS),
        )
    )
    # peft's random init makes B non-zero but tiny; scale it so a weight of 1.0 visibly restyles.
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, recipe.init_std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    dest.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(dest, unet_lora_layers=layers, safe_serialization=True)
    (dest / "imagefab_lora.json").write_text(json.dumps({"rank": recipe.rank, "targets": list(LORA_TARGETS)}))
    return dest


# SDXL inpainting's UNet reads 9 channels: the noisy latents (4), the mask at latent size (1) and
# the latents of the masked image (4). Everything else is the tiny SDXL's.
INPAINT_UNET_IN_CHANNELS = 9


def build_tiny_sdxl_inpaint(dest: Path, seed: int = 0) -> Path:
    """Write a tiny SDXL inpainting pipeline folder (model_index.json names
    `StableDiffusionXLInpaintPipeline`) to `dest`: tiny-sdxl's VAE, text encoders, tokenizers and
    scheduler for `seed`, and a seeded UNet with `INPAINT_UNET_IN_CHANNELS` input channels.

    A separate base model, like SDXL's own inpainting checkpoint: its UNet cannot serve plain
    text-to-image (it needs a mask and a masked image at every step). The shared parts are written
    by `build_tiny_sdxl` itself, so they are byte for byte tiny-sdxl's, and nothing is loaded and
    saved again (a reload would record its temporary path in the configs).
    """
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    build_tiny_sdxl(dest, seed=seed)
    # A seed stream apart from the base UNet's: the two are different models.
    torch.manual_seed(seed + 1_000_003)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": INPAINT_UNET_IN_CHANNELS})
    unet.save_pretrained(dest / "unet", safe_serialization=True)  # type: ignore[attr-defined]  # diffusers mixin
    # The inpainting pipeline's model_index: its class, its extra (empty) optional components and
    # its config (SDXL inpainting checkpoints take no aesthetic score).
    index_path = dest / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(
        {
            "_class_name": StableDiffusionXLInpaintPipeline.__name__,
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
            "requires_aesthetics_score": False,
        }
    )
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    drop_library_versions(dest)
    return dest
