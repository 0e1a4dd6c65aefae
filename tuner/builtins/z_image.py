"""Builtin Z-Image models: `tiny-z-image` (toy size, seeded, offline tokenizer) and
`arch-z-image` (the full Z-Image-Turbo architecture, random init, in bf16, for benchmarks).

The text encoder is a Qwen3 model read at its second-to-last hidden states; the tokenizer is a
real byte-level `Qwen2Tokenizer` over the 256 byte symbols (no merges, so every byte is a token)
plus Qwen's chat special tokens, with a chat template that renders what Qwen3-4B's template
renders for ZImagePipeline's call (one user turn, generation prompt, thinking enabled).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from tuner.builtins.parts import default_dtype, mmdit_vae
from tuner.builtins.tokenizers import _byte_symbols

# The FLUX.1 VAE's latent statistics: Z-Image ships the same 16-channel VAE.
Z_IMAGE_LATENT_STATS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's template, reduced to what ZImagePipeline asks of it (messages of plain strings,
# add_generation_prompt, enable_thinking); with thinking enabled it adds no <think> block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@lru_cache(maxsize=1)
def offline_qwen_tokenizer() -> Qwen2Tokenizer:
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for token in CHAT_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=32768,
        additional_special_tokens=list(CHAT_SPECIALS[1:]),
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def qwen3_config(**sizes) -> Qwen3Config:
    tokenizer = offline_qwen_tokenizer()
    return Qwen3Config(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **sizes,
    )


def qwen3_4b_config() -> Qwen3Config:
    """Qwen/Qwen3-4B, the text encoder of Z-Image (36 layers, 2560 wide, GQA 32/8 heads)."""
    return qwen3_config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
    )


def z_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Z-Image-Turbo's scheduler config: a fixed shift of 3, no resolution-dependent shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )


def z_image_transformer_config() -> dict:
    """Tongyi-MAI/Z-Image-Turbo's transformer: 30 main + 2 noise + 2 context refiner blocks,
    3840 wide, 30 heads x 128, captions of Qwen3-4B's width (2560)."""
    return {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 3840,
        "n_layers": 30,
        "n_refiner_layers": 2,
        "n_heads": 30,
        "n_kv_heads": 30,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 2560,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    }


def tiny_vae_x8() -> AutoencoderKL:
    """A toy 16-channel VAE that downsamples 8x like the real one. ZImagePipeline renders at
    1024x1024 unless told otherwise (it does not derive a size from the model's configs), so
    `tuner sample` on the tiny model decodes 128x128 latents (4096 image tokens) in seconds on
    a CPU; bucket sides step by 16, as for the real model."""
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **Z_IMAGE_LATENT_STATS,
    )


def build_tiny_z_image() -> dict:
    torch.manual_seed(11)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[1536, 512, 512],
    )
    text_encoder = Qwen3Model(
        qwen3_config(
            vocab_size=len(offline_qwen_tokenizer()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
        )
    ).eval()
    return {
        "transformer": transformer,
        "vae": tiny_vae_x8(),
        "text_encoder": text_encoder,
        "tokenizer": offline_qwen_tokenizer(),
        "scheduler": z_image_scheduler(),
    }


def build_arch_z_image() -> dict:
    """The full Z-Image architecture with random weights (6.15B transformer, Qwen3-4B, Flux
    VAE), built in bf16 (the size it trains at) for speed and memory measurements."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        return {
            "transformer": ZImageTransformer2DModel(**z_image_transformer_config()),
            "vae": mmdit_vae(**Z_IMAGE_LATENT_STATS),
            "text_encoder": Qwen3Model(qwen3_4b_config()).eval(),
            "tokenizer": offline_qwen_tokenizer(),
            "scheduler": z_image_scheduler(),
        }
