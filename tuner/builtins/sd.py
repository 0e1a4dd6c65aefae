"""Builtin Stable Diffusion 1.x/2.x models: `tiny-sd15` / `tiny-sd2` (toy size, seeded) and
`arch-sd15` / `arch-sd2` (the published SD 1.5 / 2.1 configs at full size, random init, for
benchmarks).

The full-size configs are those published with stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0, so a training step costs the same FLOPs and bytes as with the
released weights, and nothing is downloaded. Models are built seeded, in fp32, on the CPU (the
loader then casts them to the compute dtype). They are several GB each, so tests build them
under `torch.device("meta")` (shapes, no memory). Schedulers are always built on the CPU.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tuner.builtins.parts import sd_scheduler, tiny_clip, tiny_vae
from tuner.builtins.tokenizers import offline_clip_tokenizer


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


# Settings both published UNet configs (SD1.5, SDXL base) spell out identically.
UNET_COMMON = {
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    **UNET_COMMON,
}

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}


def text_config(config: dict, pad_token: str) -> CLIPTextConfig:
    """A CLIP text config whose special-token ids are the offline tokenizer's (the pooled output
    is read at the end-of-text position, so the ids must agree)."""
    tokenizer = offline_clip_tokenizer(pad_token)
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_arch_sd15() -> dict:
    """Modules for StableDiffusionPipeline with the SD1.5 architecture, random weights."""
    torch.manual_seed(15)
    with torch.device("cpu"):
        # Training needs the DDPM forward process; the released PNDM sampler adds nothing here.
        scheduler = sd_scheduler("epsilon")
    return {
        "unet": UNet2DConditionModel(**SD15_UNET),
        "vae": AutoencoderKL(**SD_VAE),
        "text_encoder": CLIPTextModel(text_config(CLIP_L_TEXT, "<|endoftext|>")),
        "tokenizer": offline_clip_tokenizer(),
        "scheduler": scheduler,
    }


# stabilityai/stable-diffusion-2-1: linear projections, per-level head widths, attention
# upcast to fp32, OpenCLIP ViT-H/14's text tower (23 layers used of 24), 768 px v-prediction.
SD21_UNET = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": True,
}

OPEN_CLIP_H_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "layer_norm_eps": 1e-5,
}


def build_arch_sd2() -> dict:
    """Modules for StableDiffusionPipeline with the SD 2.1 architecture, random weights."""
    torch.manual_seed(21)
    with torch.device("cpu"):
        scheduler = sd_scheduler("v_prediction")
    return {
        "unet": UNet2DConditionModel(**SD21_UNET),
        "vae": AutoencoderKL(**{**SD_VAE, "sample_size": 768}),
        "text_encoder": CLIPTextModel(text_config(OPEN_CLIP_H_TEXT, "!")),
        "tokenizer": offline_clip_tokenizer("!"),
        "scheduler": scheduler,
    }
