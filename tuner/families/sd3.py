"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT conditioned on CLIP-L and CLIP-G (hidden
states and pooled projections) and a T5-XXL sequence, which `model.drop_t5` leaves out (zeros in
its place, as StableDiffusion3Pipeline does without text_encoder_3)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from tuner.families import mmdit
from tuner.families.base import (
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)

T5_PARTS = ("text_encoder_3", "tokenizer_3")


class SD3Family(FamilyBase):
    spec = FamilySpec(
        name="sd3",
        pipeline="StableDiffusion3Pipeline",
        denoiser="transformer",
        default_targets=mmdit.JOINT_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(pipelines=("StableDiffusion3Pipeline",), file_keys=("joint_blocks",)),
        export=ExportNaming(
            kohya_prefixes=mmdit.MMDIT_KOHYA_PREFIXES,
            kohya_base_version="sd3",
            modelspec_architecture="stable-diffusion-3.5-large",
            # The transformer loaders pick one naming from the first key and drop layers
            # named the other way: PEFT names throughout, as diffusers' SD3 script saves.
            lora_key_naming="peft",
            # diffusers' SD3 loader reads no kohya layout (it loads such a file into 0 layers)
            # and refuses `.alpha` keys: the diffusers file, alpha folded in, is the one file
            # both diffusers and ComfyUI read at the trained strength.
            diffusers_alpha="folded",
            comfy_file="diffusers",
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        text_encoder_memory=True,
        model_options=("drop_t5",),
    )

    def validate(self, recipe) -> None:
        super().validate(recipe)
        mmdit.validate_sequence_length(recipe)

    def load(self, model, dtype: torch.dtype) -> Components:
        leave_out = T5_PARTS if model.drop_t5 else ()
        comps = mmdit.load_mmdit(self, model, dtype, SD3Transformer2DModel, leave_out)
        identity = comps.identity + (":no-t5" if model.drop_t5 else "")  # zeros instead of T5
        return replace(
            comps,
            identity=identity,
            architecture=sd3_architecture(comps.denoiser),
            sequence_length=256,
        )

    def configure(self, comps: Components, recipe) -> Components:
        return mmdit.configure_mmdit(comps, recipe, comps.sequence_length, self.spec.name)

    def build_pipeline(self, comps: Components):
        modules = {
            "transformer": comps.denoiser,
            "vae": comps.vae,
            "scheduler": comps.scheduler,
            **dict.fromkeys(T5_PARTS),  # None unless T5 was loaded
            **comps.text_encoders,
            **comps.tokenizers,
        }
        return self.spec.pipeline_class(**modules)

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt: training sees exactly what sampling computes.
        embeds, _, pooled, _ = self.build_pipeline(comps).encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=mmdit.encoder_device(comps),
            do_classifier_free_guidance=False,
            max_sequence_length=comps.sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def objective(self, comps: Components, train):
        return mmdit.flow_objective(comps, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        dtype = comps.dtype
        return comps.denoiser(
            hidden_states=noisy.to(dtype),
            timestep=timesteps,  # sigma * 1000, as the SD3 pipeline passes it
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]


def sd3_architecture(transformer) -> str:
    config = transformer.config
    if config.dual_attention_layers:
        return "stable-diffusion-3.5-medium"
    if config.num_layers >= 38:
        return "stable-diffusion-3.5-large"
    return "stable-diffusion-3-medium"
