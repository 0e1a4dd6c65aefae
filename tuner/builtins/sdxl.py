"""Builtin SDXL models: `tiny-sdxl` (toy size, seeded) and `arch-sdxl` (the published
stable-diffusion-xl-base-1.0 configs at full size, random init, for benchmarks)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tuner.builtins.parts import tiny_clip, tiny_vae
from tuner.builtins.sd import CLIP_L_TEXT, SD_VAE, UNET_COMMON, text_config
from tuner.builtins.tokenizers import offline_clip_tokenizer

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name; these are head counts (64-wide heads)
    "cross_attention_dim": 2048,  # CLIP-L 768 + OpenCLIP-bigG 1280, concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + pooled 1280
    **UNET_COMMON,
}

# Same layers as SD's VAE, retrained; it overflows in fp16, hence force_upcast.
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

OPENCLIP_BIGG_TEXT = {
    **CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler (the keys EulerDiscreteScheduler reads).
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def build_arch_sdxl() -> dict:
    """Modules for StableDiffusionXLPipeline with the SDXL-base architecture, random weights."""
    torch.manual_seed(1024)
    with torch.device("cpu"):
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return {
        "unet": UNet2DConditionModel(**SDXL_UNET),
        "vae": AutoencoderKL(**SDXL_VAE),
        "text_encoder": CLIPTextModel(text_config(CLIP_L_TEXT, "<|endoftext|>")),
        "text_encoder_2": CLIPTextModelWithProjection(text_config(OPENCLIP_BIGG_TEXT, "!")),
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": offline_clip_tokenizer("!"),  # SDXL's second tokenizer pads with "!"
        "scheduler": scheduler,
    }


TINY_TEXT_WIDTHS = (32, 48)  # unequal, like CLIP-L (768) and bigG (1280), so the order matters

TINY_POOLED = 40  # encoder 2's projection width, unlike its hidden width

TINY_TIME_DIM = 8


def build_tiny_sdxl() -> dict:
    """Modules for StableDiffusionXLPipeline at toy size: seeded, bit-identical every build."""
    torch.manual_seed(1)
    width_1, width_2 = TINY_TEXT_WIDTHS
    # Encoder 2 is the builtin CLIP's config with the projection head SDXL pools through.
    encoder_2 = CLIPTextModelWithProjection(tiny_clip(width_2, TINY_POOLED, act="gelu").config)
    with torch.device("cpu"):  # schedulers on the CPU, also when built under meta (tuner plan)
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return {
        "unet": tiny_sdxl_unet(),
        "vae": tiny_vae(scaling_factor=0.13025, force_upcast=True),
        "text_encoder": tiny_clip(width_1),
        "text_encoder_2": encoder_2,
        "tokenizer": offline_clip_tokenizer(),
        "tokenizer_2": offline_clip_tokenizer("!"),
        "scheduler": scheduler,
    }


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=sum(TINY_TEXT_WIDTHS),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_DIM + TINY_POOLED,
        norm_num_groups=8,
    )
