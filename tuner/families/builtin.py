"""Builtin tiny models (`builtin:tiny-*`): real architectures at toy size, built from config.

Weights come from a seeded random init, so every build is bit-identical. They exercise every
code path (loading, LoRA, caching, sampling, export) on a CPU in seconds; they draw noise.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tuner.families.tokenizer import offline_clip_tokenizer, vocab_size

BUILTIN_PREFIX = "builtin:"


def tiny_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def tiny_clip(hidden: int = 32, projection: int | None = None, act: str = "quick_gelu"):
    config = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        hidden_act=act,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return CLIPTextModel(config)


def tiny_sd_unet(cross_dim: int, linear_proj: bool = False) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=linear_proj,
    )


def sd_scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny_sd(version: str) -> dict:
    """Modules for StableDiffusionPipeline: 'sd15' (epsilon) or 'sd2' (v-prediction)."""
    torch.manual_seed(0 if version == "sd15" else 2)
    is_v2 = version == "sd2"
    hidden = 48 if is_v2 else 32
    return {
        "unet": tiny_sd_unet(hidden, linear_proj=is_v2),
        "vae": tiny_vae(),
        "text_encoder": tiny_clip(hidden, act="gelu" if is_v2 else "quick_gelu"),
        "tokenizer": offline_clip_tokenizer("!" if is_v2 else "<|endoftext|>"),
        "scheduler": sd_scheduler("v_prediction" if is_v2 else "epsilon"),
    }


def _lazy(module: str, function: str, *args):
    """A builder living in a family module, imported only when that builtin is used."""

    def build() -> dict:
        import importlib

        return getattr(importlib.import_module(module), function)(*args)

    return build


# name -> (family, builder returning the pipeline's modules as keyword arguments).
# tiny-*: toy-size, for tests. arch-*: the real architecture at full size, random init, for
# speed and memory benchmarks (same FLOPs and bytes as the released weights).
BUILTINS = {
    "tiny-sd15": ("sd15", lambda: build_tiny_sd("sd15")),
    "tiny-sd2": ("sd2", lambda: build_tiny_sd("sd2")),
    "arch-sd15": ("sd15", _lazy("tuner.families.arch", "build_arch_sd15")),
    "tiny-sdxl": ("sdxl", _lazy("tuner.families.sdxl", "build_tiny_sdxl")),
    "arch-sdxl": ("sdxl", _lazy("tuner.families.sdxl", "build_arch_sdxl")),
    "tiny-sd3": ("sd3", _lazy("tuner.families.sd3", "build_tiny_sd3")),
    "arch-sd35": ("sd3", _lazy("tuner.families.sd3", "build_arch_sd35")),
    "tiny-flux": ("flux", _lazy("tuner.families.flux", "build_tiny_flux")),
    "arch-flux-dev": ("flux", _lazy("tuner.families.flux", "build_arch_flux", "dev")),
    "toy": ("sd15", _lazy("tuner.toy.base", "load_toy_modules")),
}


def builtin_name(path: str) -> str | None:
    return path[len(BUILTIN_PREFIX) :] if path.startswith(BUILTIN_PREFIX) else None
