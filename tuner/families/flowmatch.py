"""What SD3/3.5 and Flux.1 share: an MMDiT transformer trained by flow matching, a T5 text
encoder whose outputs are cached, LoRA on the joint attention, and an optional quantized base."""

from __future__ import annotations

import contextlib
import string
from functools import lru_cache

import torch
from transformers import CLIPTextConfig, T5Config, T5EncoderModel, T5TokenizerFast

from tuner.errors import TunerError
from tuner.families import quantize
from tuner.families.base import Components, Family
from tuner.families.loading import model_identity
from tuner.families.tokenizer import vocab_size
from tuner.flow import build_flow_objective

# The joint attention of every MMDiT block: image stream (to_*) and text stream (add_*).
JOINT_ATTENTION = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


class FlowMatchFamily(Family):
    denoiser_name = "transformer"
    # The transformer loaders pick one naming from the first key and drop layers named the other
    # way; diffusers' UNet-era conversion would mix them (to_q as lora.down, add_q_proj as
    # lora_A). PEFT names throughout, as diffusers' own SD3/Flux training scripts save.
    lora_key_naming = "peft"
    default_targets = JOINT_ATTENTION
    # OneTrainer's layout (`lora_transformer_<diffusers module path>`, lora_down/lora_up/alpha):
    # ComfyUI maps it for both Flux and SD3 (comfy/lora.py, next to the diffusers-style
    # `transformer.` keys), diffusers' Flux loader reads it, and it keeps a trained alpha.
    kohya_prefixes = {
        "transformer": "lora_transformer",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    transformer_cls = None
    max_sequence_limit = 512  # what the pipelines accept
    latent_patch = 2  # the transformer sees 2x2 latent patches

    def leave_out(self, model) -> tuple[str, ...]:
        return ()

    def load(self, model, dtype: torch.dtype) -> Components:
        pipe = quantize.load_pipeline(
            self, model, dtype, self.transformer_cls, self.leave_out(model)
        )
        comps = self.components_from_pipeline(pipe, identity=model_identity(self.name, model))
        comps.extra["max_sequence_length"] = self.default_sequence_length(comps)
        return comps

    def default_sequence_length(self, comps: Components) -> int:
        return 256

    def configure(self, comps: Components, recipe) -> None:
        train, data = recipe.train, recipe.data
        if recipe.adapter.text_encoder:
            raise TunerError(
                f"adapter.text_encoder: text-encoder LoRA is not supported for "
                f"{self.name} (its T5 is cached, not trained); set it to false"
            )
        if train.min_snr_gamma is not None:
            raise TunerError(
                f"train.min_snr_gamma: applies to DDPM models only; {self.name} is "
                "flow-matching, use train.loss_weighting (none|sigma_sqrt|cosmap)"
            )
        self.check_sizes(comps, data)
        length = train.max_sequence_length or self.default_sequence_length(comps)
        if length > self.max_sequence_limit:
            raise TunerError(
                f"train.max_sequence_length: {length} is more than the "
                f"{self.max_sequence_limit} tokens the pipeline accepts"
            )
        comps.extra["max_sequence_length"] = length
        comps.extra["guidance"] = train.guidance
        # The cached prompt embeddings depend on the sequence length.
        comps.identity = f"{comps.identity}:t5-{length}"

    def check_sizes(self, comps: Components, data) -> None:
        multiple = self.vae_scale(comps) * self.latent_patch
        sizes = [("data.resolution", data.resolution)]
        sizes += [
            (f"data.datasets.{i}.resolution", e.resolution)
            for i, e in enumerate(data.datasets)
            if e.resolution
        ]
        buckets = data.bucket_options
        if buckets is not None:
            sizes.append(("data.buckets.step", buckets.step))
        for key, value in sizes:
            if value % multiple:
                raise TunerError(
                    f"{key}: {value} is not a multiple of {multiple}, which "
                    f"{self.name} needs (VAE x8 and 2x2 patches); use "
                    f"{max(multiple, value // multiple * multiple)}"
                )

    @staticmethod
    def vae_scale(comps: Components) -> int:
        return 2 ** (len(comps.vae.config.block_out_channels) - 1)

    def objective(self, comps: Components, train):
        config = comps.scheduler.config
        return build_flow_objective(
            comps.scheduler,
            train,
            default_shift=config.get("shift", 1.0),
            default_resolution_shift=bool(config.get("use_dynamic_shifting", False)),
        )

    def encoding_pipeline(self, comps: Components):
        """A pipeline over the loaded modules, used for its encode_prompt: training sees
        exactly the conditioning that sampling computes."""
        return self.build_pipeline(comps)

    @staticmethod
    def encoder_device(comps: Components) -> torch.device:
        return next(comps.text_encoders["text_encoder"].parameters()).device


# --- builtin helpers: an offline T5 tokenizer and T5 encoders from config -------------------


def mmdit_vae(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of SD3 and Flux (same layout; each has its own latent statistics)."""
    from diffusers import AutoencoderKL

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


@lru_cache(maxsize=1)
def offline_t5_tokenizer() -> T5TokenizerFast:
    """A real T5TokenizerFast (Unigram, `▁` word starts, </s> appended, <pad> = 0) over a tiny
    character vocabulary: no tokenizer file can be downloaded here."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = [c for c in string.printable if not c.isspace()]
    pieces = specials + [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


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
