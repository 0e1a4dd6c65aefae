"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, DDPM epsilon or v-prediction."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from tuner.families.base import Components, Family, token_ids
from tuner.families.loading import load_pipeline_modules, model_identity
from tuner.objectives import DDPMObjective


class StableDiffusionFamily(Family):
    pipeline_class = StableDiffusionPipeline
    denoiser_name = "unet"
    default_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, name: str, default_resolution: int):
        self.name = name
        self.default_resolution = default_resolution
        self.modelspec_architecture = (
            "stable-diffusion-v1" if name == "sd15" else "stable-diffusion-v2-768-v"
        )
        self.kohya_base_version = "sd_v1" if name == "sd15" else "sd_v2"

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def load(self, model, dtype: torch.dtype) -> Components:
        pipe = load_pipeline_modules(self, model, dtype)
        comps = self.components_from_pipeline(pipe, identity=model_identity(self.name, model))
        if model.prediction_type:
            comps.scheduler.register_to_config(prediction_type=model.prediction_type)
        return comps

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = comps.tokenizers["tokenizer"], comps.text_encoders["text_encoder"]
        ids = token_ids(tokenizer, prompts)
        return {"prompt_embeds": encoder(ids.to(encoder.device))[0]}

    def objective(self, comps: Components, train) -> DDPMObjective:
        # Training noise follows the DDPM formula whatever sampler the checkpoint ships.
        scheduler = DDPMScheduler.from_config(comps.scheduler.config)
        return DDPMObjective(
            scheduler, noise_offset=train.noise_offset, min_snr_gamma=train.min_snr_gamma
        )

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        return comps.denoiser(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample
