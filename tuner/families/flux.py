"""Flux.1 (dev, schnell): a flow-matching MMDiT over packed 2x2 latent patches, conditioned on
CLIP-L's pooled embedding and a T5-XXL sequence; dev also embeds a guidance value."""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel

from tuner.families.base import Components
from tuner.families.builtin import tiny_clip, tiny_vae
from tuner.families.flowmatch import (
    FlowMatchFamily,
    clip_config,
    default_dtype,
    mmdit_vae,
    offline_t5_tokenizer,
    t5_encoder,
    t5_xxl,
)
from tuner.families.tokenizer import offline_clip_tokenizer


class FluxFamily(FlowMatchFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    transformer_cls = FluxTransformer2DModel
    default_resolution = 1024
    modelspec_architecture = "flux-1-dev"
    kohya_base_version = "flux1"

    def default_sequence_length(self, comps: Components) -> int:
        return 512 if has_guidance(comps.denoiser) else 256  # BFL's dev / schnell settings

    def load(self, model, dtype: torch.dtype) -> Components:
        comps = super().load(model, dtype)
        comps.extra["dtype"] = dtype
        return comps

    def configure(self, comps: Components, recipe) -> None:
        super().configure(comps, recipe)
        self.modelspec_architecture = (
            "flux-1-dev" if has_guidance(comps.denoiser) else "flux-1-schnell"
        )

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.encoding_pipeline(comps)
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.encoder_device(comps),
            max_sequence_length=comps.extra["max_sequence_length"],
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) latents -> the velocity in the same layout."""
        transformer = comps.denoiser
        dtype = comps.extra.get("dtype", torch.float32)
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        embeds = cond["prompt_embeds"].to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if has_guidance(transformer):
            guidance = torch.full(
                (b,), comps.extra.get("guidance", 1.0), device=noisy.device, dtype=torch.float32
            )
        out = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,  # FluxPipeline's convention: the model sees sigma
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)


def has_guidance(transformer) -> bool:
    return bool(transformer.config.guidance_embeds)


# --- builtin models -----------------------------------------------------------------------


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
