"""Builtin SD3/3.5 models: `tiny-sd3` (toy size, seeded) and `arch-sd35` (SD3.5 Large at full
size, random init, in bf16, for benchmarks)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection

from tuner.builtins.parts import clip_config, default_dtype, mmdit_vae, t5_encoder, t5_xxl, tiny_vae
from tuner.builtins.tokenizers import offline_clip_tokenizer, offline_t5_tokenizer


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def sd35_large_transformer_config() -> dict:
    """SD3.5 Large: 38 blocks, 38 heads x 64, QK RMS-norm, 2432-wide context projection."""
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 38,
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
    }


# The SD3/3.5 VAE's latent statistics (its config's scaling and shift factors).
SD3_LATENT_STATS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}


def build_tiny_sd3() -> dict:
    """SD3.5 at toy size: 2 blocks with QK norm; CLIP-L and CLIP-G 32 wide (their hidden states
    concatenate to 64 = the T5 width, their projections to 64 = the pooled width)."""
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=64,
        qk_norm="rms_norm",
    )
    return {
        "transformer": transformer,
        "vae": tiny_vae(
            16,
            **SD3_LATENT_STATS,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": CLIPTextModelWithProjection(clip_config(32, 2, 2)),
        "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": CLIPTextModelWithProjection(clip_config(32, 2, 2, act="gelu")),
        "tokenizer_2": offline_clip_tokenizer("!"),
        "text_encoder_3": t5_encoder(64, 128, layers=2, heads=2, d_kv=32),
        "tokenizer_3": offline_t5_tokenizer(),
        "scheduler": sd3_scheduler(),
    }


def build_arch_sd35() -> dict:
    """The full SD3.5 Large architecture with random weights (CLIP-L, CLIP-G, T5-XXL), in bf16."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        return {
            "transformer": SD3Transformer2DModel(**sd35_large_transformer_config()),
            "vae": mmdit_vae(**SD3_LATENT_STATS),
            "text_encoder": CLIPTextModelWithProjection(clip_config(768, 12, 12, full_vocab=True)),
            "tokenizer": offline_clip_tokenizer(),
            "text_encoder_2": CLIPTextModelWithProjection(
                clip_config(1280, 32, 20, act="gelu", full_vocab=True)
            ),
            "tokenizer_2": offline_clip_tokenizer("!"),
            "text_encoder_3": t5_xxl(),
            "tokenizer_3": offline_t5_tokenizer(),
            "scheduler": sd3_scheduler(),
        }
