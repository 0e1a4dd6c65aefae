"""FLUX.1 Kontext (dev): Flux.1's transformer editing a reference image. The reference's latents
are packed into 2x2 patches like the image's and appended to the image tokens, with the same
position ids except the first channel, which is 1 (FluxKontextPipeline.prepare_latents); the
prediction of the reference tokens is dropped, so the loss is on the target tokens only. The
text side, the objective and the LoRA files are Flux's (FluxLoraLoaderMixin)."""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline

from tuner.families import mmdit
from tuner.families.base import (
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)
from tuner.families.flux import FluxFamily, has_guidance


class FluxKontextFamily(FamilyBase):
    spec = FamilySpec(
        name="flux-kontext",
        pipeline="FluxKontextPipeline",
        denoiser="transformer",
        default_targets=mmdit.JOINT_ATTENTION,
        default_resolution=1024,
        # Kontext checkpoints have Flux's keys: single files need model.family=flux-kontext.
        recognize=Recognition(pipelines=("FluxKontextPipeline",)),
        export=ExportNaming(
            kohya_prefixes=mmdit.MMDIT_KOHYA_PREFIXES,
            kohya_base_version="flux1",
            modelspec_architecture="flux-1-kontext-dev",
            lora_key_naming="peft",
            diffusers_alpha="tensors",  # as Flux: ComfyUI and diffusers' Flux loader read them
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        controls=1,
    )

    # Flux's own steps, shared as functions (no class chain): the text side and objective
    # do not change with the reference image.
    configure = FluxFamily.configure
    encode_prompts = FluxFamily.encode_prompts
    objective = FluxFamily.objective

    def validate(self, recipe) -> None:
        super().validate(recipe)
        mmdit.validate_sequence_length(recipe)

    def load(self, model, dtype: torch.dtype) -> Components:
        from diffusers import FluxTransformer2DModel

        comps = mmdit.load_mmdit(self, model, dtype, FluxTransformer2DModel)
        # Kontext dev: BFL's T5 length for dev, the guidance embedding on.
        return replace(
            comps, architecture=self.spec.export.modelspec_architecture, sequence_length=512
        )

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) target latents; the reference latents come from the batch
        (cached, or encoded here from its pixels) -> the velocity of the target only."""
        reference = reference_latents(self, comps, batch, noisy)
        return kontext_forward(comps, noisy, reference, timesteps, cond)


def reference_latents(family, comps, batch, noisy) -> torch.Tensor:
    if "control_latents" in batch:
        return batch["control_latents"][0].to(noisy.device)
    with torch.no_grad():
        return family.encode_controls(comps, batch["control_pixels"][0].to(noisy.device)).float()


def kontext_forward(comps, noisy, reference, timesteps, cond) -> torch.Tensor:
    transformer, dtype = comps.denoiser, comps.dtype
    b, c, h, w = noisy.shape
    rh, rw = reference.shape[-2:]
    pack, ids = FluxKontextPipeline._pack_latents, FluxKontextPipeline._prepare_latent_image_ids
    tokens = pack(noisy.to(dtype), b, c, h, w)
    reference_tokens = pack(reference.to(dtype), b, c, rh, rw)
    image_ids = ids(b, h // 2, w // 2, noisy.device, dtype)
    reference_ids = ids(b, rh // 2, rw // 2, noisy.device, dtype)
    reference_ids[..., 0] = 1  # the pipeline's mark of the reference image
    embeds = cond["prompt_embeds"].to(dtype)
    guidance = None
    if has_guidance(transformer):
        value = comps.guidance if comps.guidance is not None else 1.0
        guidance = torch.full((b,), value, device=noisy.device, dtype=torch.float32)
    out = transformer(
        hidden_states=torch.cat([tokens, reference_tokens], dim=1),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype),
        img_ids=torch.cat([image_ids, reference_ids], dim=0),
        return_dict=False,
    )[0]
    target = out[:, : tokens.shape[1]]  # the reference tokens' output is not trained
    return FluxKontextPipeline._unpack_latents(target, h, w, 1)
