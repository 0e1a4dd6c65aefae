"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, DDPM epsilon or v-prediction.

SD 1.x and 2.x share the pipeline; 2.x is told apart by its UNet's linear attention projections
(OpenCLIP-H conditioning) in a folder or hub config, and by its OpenCLIP keys in a single file.
"""

from __future__ import annotations

import torch

from tuner.families.base import (
    UNET_ATTENTION,
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    token_ids,
)
from tuner.families.loading import load_pipeline_modules, model_identity
from tuner.objectives.ddpm import DDPMObjective, ddpm_objective

SD_KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
SD_FILE_UNET = "model.diffusion_model.input_blocks"
OPENCLIP_KEYS = "cond_stage_model.model."
SDXL_KEYS = "conditioner.embedders.1"


def uses_linear_projection(config) -> bool:
    return bool(config.get("use_linear_projection"))


class StableDiffusionBase(FamilyBase):
    pipeline_extras = {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }

    def load(self, model, dtype: torch.dtype) -> Components:
        pipe = load_pipeline_modules(self, model, dtype)
        comps = self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)
        if model.prediction_type:
            comps.scheduler.register_to_config(prediction_type=model.prediction_type)
        return comps

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokenizer, encoder = comps.tokenizers["tokenizer"], comps.text_encoders["text_encoder"]
        ids = token_ids(tokenizer, prompts)
        return {"prompt_embeds": encoder(ids.to(encoder.device))[0]}

    def objective(self, comps: Components, train) -> DDPMObjective:
        return ddpm_objective(comps.scheduler, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        return comps.denoiser(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"]).sample


class SD15Family(StableDiffusionBase):
    spec = FamilySpec(
        name="sd15",
        pipeline="StableDiffusionPipeline",
        denoiser="unet",
        default_targets=UNET_ATTENTION,
        default_resolution=512,
        recognize=Recognition(
            pipelines=("StableDiffusionPipeline",),
            unet_config=lambda config: not uses_linear_projection(config),
            file_keys=(SD_FILE_UNET,),
            file_keys_absent=(OPENCLIP_KEYS, SDXL_KEYS),
        ),
        export=ExportNaming(
            kohya_prefixes=SD_KOHYA_PREFIXES,
            kohya_base_version="sd_v1",
            modelspec_architecture="stable-diffusion-v1",
        ),
        model_options=("prediction_type",),
    )


class SD2Family(StableDiffusionBase):
    spec = FamilySpec(
        name="sd2",
        pipeline="StableDiffusionPipeline",
        denoiser="unet",
        default_targets=UNET_ATTENTION,
        default_resolution=768,
        recognize=Recognition(
            pipelines=("StableDiffusionPipeline",),
            unet_config=uses_linear_projection,
            file_keys=(OPENCLIP_KEYS,),
        ),
        export=ExportNaming(
            kohya_prefixes=SD_KOHYA_PREFIXES,
            kohya_base_version="sd_v2",
            modelspec_architecture="stable-diffusion-v2-768-v",
        ),
        model_options=("prediction_type",),
    )
