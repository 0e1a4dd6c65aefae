"""Builtin Qwen-Image models: `tiny-qwen-image` (toy size, seeded, offline tokenizer) and
`arch-qwen-image` (the full 20B transformer, Qwen2.5-VL-7B and the 16-channel 3D VAE, random
init, in bf16, for benchmarks).

The offline tokenizer is a real `Qwen2Tokenizer` (byte-level BPE, Qwen's pre-tokenizer regex and
its chat special tokens) over the 256 byte symbols, plus merges that spell the words of
QwenImagePipeline's system prompt: its prefix then tokenizes to exactly the 34 tokens the
pipeline drops (`prompt_template_encode_start_idx`), as with the real tokenizer, so only the
user's words and the template's closing tokens reach the transformer.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
)
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from tuner.builtins.parts import default_dtype
from tuner.builtins.tokenizers import _byte_symbols

# Qwen2's special tokens: the chat template's and the vision markers the VL config names.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen/Qwen-Image's scheduler_config.json: exponential shift by image sequence length
    (mu from 0.5 at 256 tokens to 0.9 at 8192), sampling sigmas stretched to end at 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def qwen_image_transformer_config() -> dict:
    """Qwen-Image's transformer: 60 dual-stream blocks, 24 heads x 128, text width 3584."""
    return {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56),
    }


def qwen25_vl_7b_config(vocab_size: int = 152064) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder/config.json)."""
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1000000.0,
            },
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    )


def template_words() -> list[str]:
    """The pre-tokenized words of the pipeline's prompt template (byte-level symbols, `Ġ` for a
    leading space), outside its special tokens."""
    text = (
        "system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
        "text, spatial relationships of the objects and background:\nuser\nassistant\n"
    )
    words = []
    for line in text.split("\n"):
        for i, word in enumerate(line.replace(",", "").replace(":", "").split(" ")):
            if word:
                words.append(("Ġ" if i else "") + word)
    return words


@lru_cache(maxsize=1)
def offline_qwen2_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 BPE: every byte is a token, and chained merges spell the template's
    words, so the template's system prefix is 34 tokens as with Qwen's own vocabulary."""
    symbols = _byte_symbols()
    merges: list[tuple[str, str]] = []
    pieces: list[str] = []
    for word in template_words():
        for end in range(2, len(word) + 1):
            pair = (word[: end - 1], word[end - 1])
            if pair not in merges:
                merges.append(pair)
                pieces.append(word[:end])
    tokens = list(dict.fromkeys(symbols + pieces + list(SPECIAL_TOKENS)))
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges, model_max_length=32768
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def tiny_text_encoder(tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    vocab = tokenizer.get_vocab()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "rope_theta": 1000000.0,
            },
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image() -> dict:
    """Qwen-Image at toy size: the real VAE layout (x8, 16 latent channels with Qwen's latent
    statistics) at base width 8, a 2-block transformer, a 2-layer Qwen2.5-VL."""
    torch.manual_seed(11)
    tokenizer = offline_qwen2_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, num_res_blocks=1)
    with torch.no_grad():  # a random decoder outputs near-constant gray; a trained one spans
        vae.decoder.conv_out.weight.mul_(4)  # [-1, 1]: this gain gives std ~0.4, so the
        vae.decoder.conv_out.bias.mul_(4)  # tests see what a latent change does to an image
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": tiny_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "scheduler": qwen_image_scheduler(),
    }


def build_arch_qwen_image() -> dict:
    """The full Qwen-Image architecture with random weights, built in bf16."""
    torch.manual_seed(0)
    tokenizer = offline_qwen2_tokenizer()
    with default_dtype(torch.bfloat16):
        return {
            "transformer": QwenImageTransformer2DModel(**qwen_image_transformer_config()),
            "vae": AutoencoderKLQwenImage(),  # the released VAE's config is the class default
            "text_encoder": Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config()).eval(),
            "tokenizer": tokenizer,
            "scheduler": qwen_image_scheduler(),
        }
