"""Building blocks of the builtin models: toy-size VAEs and CLIP/T5 text encoders, the full-size
MMDiT VAE and T5-XXL encoder, and the SD noise schedule. Seeded by the callers."""

from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tuner.builtins.tokenizers import offline_t5_tokenizer, vocab_size


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


def mmdit_vae(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of SD3 and Flux (same layout; each has its own latent statistics)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def t5_encoder(
    d_model: int, d_ff: int, layers: int, heads: int, d_kv: int, vocab_size: int | None = None
) -> T5EncoderModel:
    """A T5 v1.1 encoder (gated GELU, untied embeddings), as used by SD3 and Flux."""
    config = T5Config(
        vocab_size=vocab_size or len(offline_t5_tokenizer()),
        d_model=d_model,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        d_kv=d_kv,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config).eval()  # as from_pretrained returns it: dropout off


def t5_xxl() -> T5EncoderModel:
    """T5 v1.1 XXL's encoder (google/t5-v1_1-xxl), random init: the text encoder SD3 and Flux
    share."""
    return t5_encoder(4096, 10240, layers=24, heads=64, d_kv=64, vocab_size=32128)


def clip_config(
    hidden: int,
    layers: int,
    heads: int,
    act: str = "quick_gelu",
    projection: int | None = None,
    full_vocab: bool = False,
) -> CLIPTextConfig:
    """A CLIP text config whose special-token ids are those of the offline CLIP tokenizer
    (CLIP pools at the first end-of-text id, so it must match the tokenizer's)."""
    return CLIPTextConfig(
        vocab_size=49408 if full_vocab else vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 4 if full_vocab else hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
