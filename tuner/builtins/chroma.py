"""Builtin Chroma models: `tiny-chroma` (toy size, seeded) and `arch-chroma` (the full Chroma1-HD
architecture, random init, in bf16, for benchmarks)."""

from __future__ import annotations

import torch
from diffusers import ChromaTransformer2DModel

from tuner.builtins.flux import FLUX_LATENT_STATS, flux_scheduler
from tuner.builtins.parts import default_dtype, mmdit_vae, t5_encoder, t5_xxl, tiny_vae
from tuner.builtins.tokenizers import offline_t5_tokenizer


def chroma_transformer_config() -> dict:
    """Chroma1-HD's transformer: Flux's 19 double + 38 single blocks (24 heads x 128), with a
    5-layer, 5120-wide approximator in place of the per-block modulation."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "axes_dims_rope": (16, 56, 56),
        "approximator_num_channels": 64,
        "approximator_hidden_dim": 5120,
        "approximator_layers": 5,
    }


def build_tiny_chroma() -> dict:
    """Chroma at toy size: T5 only, the Flux VAE's latent statistics, resolution-dependent
    shift (the scheduler Chroma1-HD ships is Flux.1-dev's)."""
    torch.manual_seed(11)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    return {
        "transformer": transformer,
        "vae": tiny_vae(16, **FLUX_LATENT_STATS, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": t5_encoder(32, 64, layers=2, heads=2, d_kv=16),
        "tokenizer": offline_t5_tokenizer(),
        "scheduler": flux_scheduler("dev"),
    }


def build_arch_chroma() -> dict:
    """The full Chroma1-HD architecture with random weights (T5-XXL, 16-channel Flux VAE), built
    in bf16 for speed and memory measurements."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        return {
            "transformer": ChromaTransformer2DModel(**chroma_transformer_config()),
            "vae": mmdit_vae(**FLUX_LATENT_STATS),
            "text_encoder": t5_xxl(),
            "tokenizer": offline_t5_tokenizer(),
            "scheduler": flux_scheduler("dev"),
        }
