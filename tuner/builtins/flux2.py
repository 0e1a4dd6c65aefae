"""Builtin Flux.2 models: `tiny-flux2-dev` and `tiny-flux2-klein` (toy size, seeded, offline
tokenizers) and `arch-flux2-dev`, `arch-flux2-klein-4b`, `arch-flux2-klein-9b` (the released
architectures with random weights, in bf16, for speed and memory figures).

The pipelines read fixed hidden-state layers of their text encoders (dev: Mistral's 10, 20, 30;
klein: Qwen3's 9, 18, 27) and concatenate them, so the toy encoders are narrow but as deep as
those indices need. Dev's tokenizer slot holds a PixtralProcessor for the real model; the toy
holds a byte-level tokenizer with a Mistral-style chat template, which answers the one call the
pipeline makes (apply_chat_template on system + user messages of text parts).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2Tokenizer,
    Qwen3ForCausalLM,
)

from tuner.builtins.parts import default_dtype
from tuner.builtins.tokenizers import _byte_symbols
from tuner.builtins.z_image import offline_qwen_tokenizer, qwen3_4b_config, qwen3_config

# Mistral Small 3.1's chat layout for text-only messages (system prompt, one user turn),
# rendered over content lists of {"type": "text"} parts as Flux2Pipeline's format_input builds.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message['content'] | map(attribute='text') | join('') %}"
    "{%- if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{ '[INST]' + text + '[/INST]' }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIALS = ("<pad>", "<s>", "</s>")


@lru_cache(maxsize=1)
def offline_mistral_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer (every byte one token) with Mistral's <s> and <pad>."""
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for token in MISTRAL_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=131072,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token=None,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's scheduler config: the pipeline passes mu (compute_empirical_mu) at sampling."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


# The released transformers (black-forest-labs/FLUX.2-dev, FLUX.2-klein-4B / -9B and their
# -base twins): 48 x 128 heads, 8 double + 48 single blocks for dev; klein is narrower,
# has no guidance embedding, and its context width is three Qwen3 hidden states.
TRANSFORMER_CONFIGS = {
    "dev": {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48},
    "klein-4b": {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24},
    "klein-9b": {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32},
}
CONTEXT_WIDTH = {"dev": 3 * 5120, "klein-4b": 3 * 2560, "klein-9b": 3 * 4096}


def flux2_transformer_config(variant: str) -> dict:
    return {
        "patch_size": 1,
        "in_channels": 128,
        "attention_head_dim": 128,
        "joint_attention_dim": CONTEXT_WIDTH[variant],
        "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (32, 32, 32, 32),
        "rope_theta": 2000,
        "guidance_embeds": variant == "dev",
        **TRANSFORMER_CONFIGS[variant],
    }


def mistral_small_config() -> Mistral3Config:
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: 40 layers, 5120 wide, GQA 32/8 heads,
    and its 24-layer Pixtral vision tower."""
    text = MistralConfig(
        vocab_size=131072,
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
        sliding_window=None,
    )
    vision = PixtralVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=1540,
        patch_size=14,
    )
    return Mistral3Config(
        text_config=text, vision_config=vision, spatial_merge_size=2, tie_word_embeddings=False
    )


def qwen3_8b_config():
    """Qwen/Qwen3-8B, klein-9B's text encoder: 36 layers, 4096 wide, GQA 32/8 heads."""
    return qwen3_config(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )


def tiny_vae() -> AutoencoderKLFlux2:
    """x8 like the real VAE (4 levels), 8 latent channels (32 in the real one): 32 after 2x2
    patchifying. Its batch-norm statistics are seeded, not the identity, so that encoding and
    decoding exercise the normalization the pipeline applies."""
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=64,
    )
    generator = torch.Generator().manual_seed(3)
    vae.bn.running_mean.copy_(0.1 * torch.randn(32, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(32, generator=generator))
    with torch.no_grad():  # a random toy decoder barely varies its output: make it see latents
        vae.decoder.conv_out.weight.mul_(8.0)
    return vae.eval()


def tiny_transformer(context: int, guidance: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=32,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=context,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    )


def build_tiny_flux2_dev() -> dict:
    torch.manual_seed(13)
    tokenizer = offline_mistral_tokenizer()
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=31,  # hidden_states[30] is read
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        sliding_window=None,
    )
    vision = PixtralVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    ).eval()
    return {
        "transformer": tiny_transformer(3 * 8, guidance=True),
        "vae": tiny_vae(),
        "text_encoder": encoder,
        "tokenizer": tokenizer,
        "scheduler": flux2_scheduler(),
    }


def build_tiny_flux2_klein() -> dict:
    """klein at toy size, the base (undistilled) variant: sampled with CFG like klein-base."""
    torch.manual_seed(17)
    encoder = Qwen3ForCausalLM(
        qwen3_config(
            vocab_size=len(offline_qwen_tokenizer()),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=28,  # hidden_states[27] is read
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            max_position_embeddings=1024,
        )
    ).eval()
    return {
        "transformer": tiny_transformer(3 * 8, guidance=False),
        "vae": tiny_vae(),
        "text_encoder": encoder,
        "tokenizer": offline_qwen_tokenizer(),
        "scheduler": flux2_scheduler(),
        "is_distilled": False,
    }


def build_arch_flux2(variant: str) -> dict:
    """The full architecture with random weights, in bf16: dev (32B transformer, Mistral Small
    3.1 24B) or klein-4b / klein-9b (Qwen3-4B / Qwen3-8B; the step-distilled release)."""
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        modules = {
            "transformer": Flux2Transformer2DModel(**flux2_transformer_config(variant)),
            "vae": AutoencoderKLFlux2(),
            "scheduler": flux2_scheduler(),
        }
        if variant == "dev":
            modules["text_encoder"] = Mistral3ForConditionalGeneration(mistral_small_config())
            modules["tokenizer"] = offline_mistral_tokenizer()
        else:
            config = qwen3_4b_config() if variant == "klein-4b" else qwen3_8b_config()
            modules["text_encoder"] = Qwen3ForCausalLM(config)
            modules["tokenizer"] = offline_qwen_tokenizer()
            modules["is_distilled"] = True
        modules["text_encoder"].eval()
        return modules
