"""Flux.1 (dev, schnell): a flow-matching MMDiT over packed 2x2 latent patches, conditioned on
CLIP-L's pooled embedding and a T5-XXL sequence; dev also embeds a guidance value."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from tuner.families import mmdit
from tuner.families.base import (
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)


class FluxFamily(FamilyBase):
    spec = FamilySpec(
        name="flux",
        pipeline="FluxPipeline",
        denoiser="transformer",
        default_targets=mmdit.JOINT_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("FluxPipeline",),
            file_keys=("double_blocks",),
            # Chroma checkpoints have double blocks too, and an approximator Flux never has;
            # FLUX.2 ones have shared stream modulations (family flux2).
            file_keys_absent=("distilled_guidance_layer", "single_stream_modulation"),
        ),
        export=ExportNaming(
            kohya_prefixes=mmdit.MMDIT_KOHYA_PREFIXES,
            kohya_base_version="flux1",
            modelspec_architecture="flux-1-dev",
            # The transformer loaders pick one naming from the first key and drop layers
            # named the other way: PEFT names throughout, as diffusers' Flux script saves.
            lora_key_naming="peft",
            # ComfyUI reads both files; the diffusers file carries `.alpha` tensors for it
            # (diffusers' Flux loader reads those too, when the file has no LoraConfig metadata).
            diffusers_alpha="tensors",
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        text_encoder_memory=True,
    )

    def validate(self, recipe) -> None:
        super().validate(recipe)
        mmdit.validate_sequence_length(recipe)

    def load(self, model, dtype: torch.dtype) -> Components:
        comps = mmdit.load_mmdit(self, model, dtype, FluxTransformer2DModel)
        dev = has_guidance(comps.denoiser)
        return replace(
            comps,
            architecture="flux-1-dev" if dev else "flux-1-schnell",
            sequence_length=512 if dev else 256,  # BFL's T5 lengths for dev and schnell
        )

    def configure(self, comps: Components, recipe) -> Components:
        return mmdit.configure_mmdit(comps, recipe, comps.sequence_length, self.spec.name)

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt: training sees exactly what sampling computes.
        embeds, pooled, _ = self.build_pipeline(comps).encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=mmdit.encoder_device(comps),
            max_sequence_length=comps.sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def objective(self, comps: Components, train):
        return mmdit.flow_objective(comps, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) latents -> the velocity in the same layout."""
        transformer, dtype = comps.denoiser, comps.dtype
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        embeds = cond["prompt_embeds"].to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if has_guidance(transformer):
            value = comps.guidance if comps.guidance is not None else 1.0
            guidance = torch.full((b,), value, device=noisy.device, dtype=torch.float32)
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
