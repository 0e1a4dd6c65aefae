"""Real architectures at full size with random weights (`builtin:arch-*`), for speed and memory
benchmarks.

The configs are those published with stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0, so
a training step costs the same FLOPs and bytes as with the released weights, and nothing is
downloaded. The tokenizer is the offline byte-level one: smaller token ids, the same 77-token
sequences, so the text encoders do the same work.

Models are built seeded, in fp32, on the CPU (the loader then casts them to the compute dtype).
Building touches every byte once: seconds for SD1.5, tens of seconds for SDXL. They are several
GB each, so tests build them under `torch.device("meta")` (shapes, no memory) and never for
real. The schedulers are always built on the CPU, so their tables exist under any device context.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner.families.builtin import sd_scheduler
from tuner.families.tokenizer import offline_clip_tokenizer

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

# Same layers as SD's VAE, retrained; it overflows in fp16, hence force_upcast.
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

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
