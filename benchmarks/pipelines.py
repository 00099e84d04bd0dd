"""SDXL pipelines with random weights for the benchmarks: the same arithmetic as the released
weights, no download.

`build_pipeline("sdxl", ...)` builds the SDXL-base architecture from the configs in
benchmarks/sdxl/; `build_pipeline("tiny", ...)` the offline tiny model's (`app/models/tiny.py`).
`save_random_lora` writes a random LoRA for a pipeline's UNet in diffusers' file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SDXL_CONFIGS = Path(__file__).resolve().parent / "sdxl"


def byte_tokenizer():
    """A CLIP tokenizer over the 256 byte symbols only: prompts pad to 77 tokens either way, so the
    text encoders do the same arithmetic as with the real vocabulary (which needs open_clip)."""
    from transformers import CLIPTokenizer

    from app.models.tiny import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")


def build_pipeline(config: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A StableDiffusionXLPipeline of the chosen architecture with random weights, on `device`.

    The same `seed` gives the same weights: every compiled row builds its own copy this way."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from app.models import tiny

    if config == "sdxl":
        unet_cfg = {
            k: v for k, v in json.loads((SDXL_CONFIGS / "unet.json").read_text()).items() if not k.startswith("_")
        }
        vae_cfg = {
            k: v for k, v in json.loads((SDXL_CONFIGS / "vae.json").read_text()).items() if not k.startswith("_")
        }
        te1 = CLIPTextConfig(
            **{
                k: v
                for k, v in json.loads((SDXL_CONFIGS / "text_encoder.json").read_text()).items()
                if k != "architectures"
            }
        )
        te2 = CLIPTextConfig(
            **{
                k: v
                for k, v in json.loads((SDXL_CONFIGS / "text_encoder_2.json").read_text()).items()
                if k != "architectures"
            }
        )
    else:
        unet_cfg, vae_cfg = dict(tiny.TINY_UNET), dict(tiny.TINY_VAE)
        ids = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        te1, te2 = CLIPTextConfig(**ids, **tiny.TINY_TEXT), CLIPTextConfig(**ids, **tiny.TINY_TEXT_2)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, for 2.6B weights
        unet = UNet2DConditionModel(**unet_cfg).to(dtype)
        vae = AutoencoderKL(**vae_cfg).to(dtype)
        text_encoder = CLIPTextModel(te1).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(te2).to(dtype)
    tok = byte_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**tiny.SDXL_SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_lora(pipe, folder: Path, rank: int, seed: int = 1) -> Path:
    """A random LoRA for this UNet in diffusers' file format (what a trained LoRA would be)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from app.models.tiny import LORA_TARGETS

    unet = pipe.unet
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(LORA_TARGETS)),
        adapter_name="bench_tmp",
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="bench_tmp"))
    layers = {k: (v * 0.01).to(torch.float32).cpu() for k, v in layers.items()}  # a mild, realistic delta
    unet.delete_adapters("bench_tmp")
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder
