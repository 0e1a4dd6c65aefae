"""Builtin Flux.1 models: `tiny-flux` (dev at toy size, seeded) and `arch-flux-dev` (the full
FLUX.1 architecture, random init, in bf16, for benchmarks)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel

from tuner.builtins.parts import (
    clip_config,
    default_dtype,
    mmdit_vae,
    t5_encoder,
    t5_xxl,
    tiny_clip,
    tiny_vae,
)
from tuner.builtins.tokenizers import offline_clip_tokenizer, offline_t5_tokenizer


def flux_scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    if variant == "schnell":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def flux_transformer_config(variant: str) -> dict:
    """FLUX.1-dev / -schnell transformer: 19 double + 38 single blocks, 24 heads x 128."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": variant == "dev",
        "axes_dims_rope": (16, 56, 56),
    }


# The FLUX.1 VAE's latent statistics (its config's scaling and shift factors).
FLUX_LATENT_STATS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def build_tiny_flux() -> dict:
    """Flux.1-dev at toy size (guidance embedding on, resolution-dependent shift)."""
    torch.manual_seed(7)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return {
        "transformer": transformer,
        "vae": tiny_vae(
            16,
            **FLUX_LATENT_STATS,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": tiny_clip(32),
        "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": t5_encoder(32, 64, layers=2, heads=2, d_kv=16),
        "tokenizer_2": offline_t5_tokenizer(),
        "scheduler": flux_scheduler("dev"),
    }


def build_arch_flux(variant: str = "dev") -> dict:
    """The full FLUX.1 architecture with random weights (CLIP-L + T5-XXL, 16-channel VAE), built
    in bf16 (the size it trains at) for speed and memory measurements."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        return {
            "transformer": FluxTransformer2DModel(**flux_transformer_config(variant)),
            "vae": mmdit_vae(**FLUX_LATENT_STATS),
            "text_encoder": CLIPTextModel(clip_config(768, 12, 12, full_vocab=True)),
            "tokenizer": offline_clip_tokenizer(),
            "text_encoder_2": t5_xxl(),
            "tokenizer_2": offline_t5_tokenizer(),
            "scheduler": flux_scheduler(variant),
        }


def build_tiny_flux_kontext() -> dict:
    """FLUX.1 Kontext at toy size: tiny-flux's modules (Kontext is Flux.1-dev's architecture;
    what differs is how the pipeline feeds the reference image)."""
    return build_tiny_flux()


def build_arch_flux_kontext() -> dict:
    """The full FLUX.1 Kontext [dev] architecture (FLUX.1-dev's), random init, in bf16."""
    return build_arch_flux("dev")
