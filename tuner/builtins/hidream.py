"""Builtin HiDream-I1 models: `tiny-hidream` (toy size, seeded, offline tokenizers) and
`arch-hidream` (HiDream-I1-Full's 17B MoE transformer, CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B and
the Flux VAE, random init, in bf16, for benchmarks).

The Llama tokenizer is built offline like our CLIP one: a byte-level BPE over the 256 byte
symbols with no merges, Llama 3's special tokens, `<|begin_of_text|>` prepended by the
post-processor and `<|eot_id|>` as end (the pipeline pads with it, as Llama-3.1-Instruct's).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HiDreamImageTransformer2DModel,
    UniPCMultistepScheduler,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModelWithProjection,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tuner.builtins.flux import FLUX_LATENT_STATS
from tuner.builtins.parts import clip_config, default_dtype, mmdit_vae, t5_encoder, t5_xxl, tiny_vae
from tuner.builtins.tokenizers import _byte_symbols, offline_clip_tokenizer, offline_t5_tokenizer

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
CLIP_POSITIONS = 248  # HiDream's CLIP-L/G are long-context CLIPs (the pipeline uses up to 218)


def hidream_scheduler(variant: str = "full"):
    """The schedulers HiDream-I1 ships: Full samples with flow UniPC (shift 3, 50 steps, CFG
    5); Dev and Fast are guidance- and step-distilled, sampled with flow Euler at shift 6 (28
    steps) and shift 3 (16 steps), no CFG."""
    with torch.device("cpu"):  # its sigma table is real data, also under a meta-device build
        return _scheduler(variant)


def _scheduler(variant: str):
    if variant == "full":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000,
            flow_shift=3.0,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
        )
    shift = {"dev": 6.0, "fast": 3.0}[variant]
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def hidream_transformer_config() -> dict:
    """HiDream-I1's transformer: 16 dual-stream + 32 single-stream blocks, 20 heads x 128, MoE
    FFNs (4 routed experts, top 2, and a shared one), each block reading one Llama layer."""
    return {
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 16,
        "num_single_layers": 32,
        "attention_head_dim": 128,
        "num_attention_heads": 20,
        "caption_channels": [4096, 4096],
        "text_emb_dim": 2048,
        "num_routed_experts": 4,
        "num_activated_experts": 2,
        "axes_dims_rope": (64, 32, 32),
        "max_resolution": (128, 128),
        "llama_layers": list(range(32)) + [31] * 16,
    }


def llama31_8b_config(vocab_size: int = 128256) -> LlamaConfig:
    """meta-llama/Meta-Llama-3.1-8B-Instruct's config."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    )


@lru_cache(maxsize=1)
def offline_llama_tokenizer() -> PreTrainedTokenizerFast:
    symbols = list(dict.fromkeys(_byte_symbols()))
    vocab = {s: i for i, s in enumerate(symbols + list(LLAMA_SPECIALS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    bos = LLAMA_SPECIALS[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        model_max_length=131072,
    )


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    vocab = tokenizer.get_vocab()
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=vocab["<|eot_id|>"],
    )
    return LlamaForCausalLM(config).eval()


def long_clip(hidden: int, layers: int, heads: int, act: str, projection: int, full: bool = False):
    config = clip_config(hidden, layers, heads, act=act, projection=projection, full_vocab=full)
    config.max_position_embeddings = CLIP_POSITIONS
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_hidream(variant: str = "full") -> dict:
    """HiDream-I1 at toy size: one dual- and one single-stream block with 3 routed experts (top
    2) and a shared one, CLIP-L/G projecting to 16 each (pooled width 32), a 32-wide T5 and a
    2-layer Llama (each block reads one of its layers), the Flux VAE's latent statistics.
    max_resolution 16 latents: the pipeline samples at (16 x VAE 2)^2 = 32^2 pixels."""
    torch.manual_seed(17)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[32, 32],
        text_emb_dim=32,
        num_routed_experts=3,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        max_resolution=(16, 16),
        llama_layers=[0, 1],
    ).eval()  # as from_pretrained returns it (train mode changes its output layout)
    llama_tokenizer = offline_llama_tokenizer()
    return {
        "transformer": transformer,
        "vae": tiny_vae(16, **FLUX_LATENT_STATS, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": long_clip(32, 2, 2, "quick_gelu", 16),
        "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": long_clip(32, 2, 2, "gelu", 16),
        "tokenizer_2": offline_clip_tokenizer("!"),
        "text_encoder_3": t5_encoder(32, 64, layers=2, heads=2, d_kv=16),
        "tokenizer_3": offline_t5_tokenizer(),
        "text_encoder_4": tiny_llama(llama_tokenizer),
        "tokenizer_4": llama_tokenizer,
        "scheduler": hidream_scheduler(variant),
    }


def build_arch_hidream(variant: str = "full") -> dict:
    """The full HiDream-I1 architecture with random weights, built in bf16."""
    torch.manual_seed(0)
    llama_tokenizer = offline_llama_tokenizer()
    with default_dtype(torch.bfloat16):
        return {
            "transformer": HiDreamImageTransformer2DModel(**hidream_transformer_config()).eval(),
            "vae": mmdit_vae(**FLUX_LATENT_STATS),
            "text_encoder": long_clip(768, 12, 12, "quick_gelu", 768, full=True),
            "tokenizer": offline_clip_tokenizer(),
            "text_encoder_2": long_clip(1280, 32, 20, "gelu", 1280, full=True),
            "tokenizer_2": offline_clip_tokenizer("!"),
            "text_encoder_3": t5_xxl(),
            "tokenizer_3": offline_t5_tokenizer(),
            "text_encoder_4": LlamaForCausalLM(llama31_8b_config()).eval(),
            "tokenizer_4": llama_tokenizer,
            "scheduler": hidream_scheduler(variant),
        }
