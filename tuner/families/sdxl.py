"""Stable Diffusion XL: two CLIP text encoders, a pooled embedding, and size/crop conditioning.

- Prompts: the penultimate hidden states of CLIP-L and OpenCLIP-bigG, concatenated on the feature
  axis, plus the pooled (projected) output of the second encoder.
- time_ids: (original h, w, crop top, left, target h, w) per sample, from the data pipeline's
  real bucket and crop, so the model learns each image's true framing.
- VAE: fp32 unless `model.vae_path` names a VAE that is safe in half precision (the released
  SDXL VAE overflows in fp16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from tuner.errors import TunerError
from tuner.families.base import (
    UNET_ATTENTION,
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    token_ids,
)
from tuner.families.loading import (
    HUB_ID,
    PICKLE_SUFFIXES,
    load_pipeline_modules,
    model_identity,
    source_kind,
)
from tuner.objectives.ddpm import DDPMObjective, ddpm_objective

ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class SDXLFamily(FamilyBase):
    spec = FamilySpec(
        name="sdxl",
        pipeline="StableDiffusionXLPipeline",
        denoiser="unet",
        default_targets=UNET_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("StableDiffusionXLPipeline",), file_keys=("conditioner.embedders.1",)
        ),
        export=ExportNaming(
            kohya_prefixes={
                "unet": "lora_unet",
                "text_encoder": "lora_te1",
                "text_encoder_2": "lora_te2",
            },
            kohya_base_version="sdxl_base_v1-0",
            modelspec_architecture="stable-diffusion-xl-v1-base",
        ),
        model_options=("prediction_type", "vae_path"),
    )
    pipeline_extras = {"add_watermarker": False}  # samples should show the model, unaltered

    # ---- loading -------------------------------------------------------------------------
    def load(self, model, dtype: torch.dtype) -> Components:
        # The VAE is read first so the pipeline never loads (or rounds) a VAE it then drops.
        vae = load_vae(model, dtype) if model.vae_path else released_vae_in_fp32(model)
        pipe = load_pipeline_modules(self, model, dtype, None if vae is None else {"vae": vae})
        # Another VAE (model.vae_path) means other latents: it is part of the identity.
        comps = self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)
        # Builtins are cast as a whole and a single file's VAE comes in the compute dtype, so
        # the dtype is settled here (their weights keep that dtype's rounding).
        comps.vae.to(dtype if model.vae_path else torch.float32)
        decode_in_vae_dtype(comps.vae)
        # One image at a time through the VAE: a batch of 8 at 1024x1024 in fp32 (the latent
        # cache's batch) would need more activation memory than training itself.
        comps.vae.enable_slicing()
        if model.prediction_type:
            comps.scheduler.register_to_config(prediction_type=model.prediction_type)
        return comps

    # ---- encoding ------------------------------------------------------------------------
    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden = []
        for tokenizer_name, encoder_name in ENCODERS:
            tokenizer = comps.tokenizers[tokenizer_name]
            encoder = comps.text_encoders[encoder_name]
            ids = token_ids(tokenizer, prompts)
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        # The loop ends on encoder 2 (CLIPTextModelWithProjection): its projection is the pooled
        # embedding the UNet's added conditioning expects.
        return {
            "prompt_embeds": torch.cat(hidden, dim=-1),
            "pooled_prompt_embeds": output.text_embeds,
        }

    # ---- training ------------------------------------------------------------------------
    def objective(self, comps: Components, train) -> DDPMObjective:
        # SDXL ships an Euler sampler, whose add_noise works in sigma space; training needs the
        # DDPM forward process over the same betas and prediction type.
        return ddpm_objective(comps.scheduler, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        added = {
            "text_embeds": cond["pooled_prompt_embeds"],
            "time_ids": time_ids(batch).to(noisy.device),
        }
        return comps.denoiser(
            noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added
        ).sample


def time_ids(batch: dict) -> torch.Tensor:
    """(B, 6) float: original (h, w), crop (top, left), target (h, w) of each sample. Float32
    keeps sizes above 256 exact (bf16 would round them); the UNet embeds them in fp32 anyway."""
    parts = (batch["original_size"], batch["crop_top_left"], batch["target_size"])
    return torch.cat(parts, dim=1).to(torch.float32)


# ---- the VAE ---------------------------------------------------------------------------------


def released_vae_in_fp32(model) -> AutoencoderKL | None:
    """The model's own VAE read in fp32, from a folder or the hub; None for other sources."""
    kind = source_kind(model.path)
    if kind not in ("folder", "hub"):
        return None
    path = str(Path(model.path).expanduser()) if kind == "folder" else model.path
    try:
        return AutoencoderKL.from_pretrained(
            path,
            subfolder="vae",
            revision=model.revision,
            variant=model.variant,
            torch_dtype=torch.float32,
            use_safetensors=None if model.allow_pickle else True,
        )
    except OSError:
        return None  # the pipeline load below reports what is wrong with the model


def load_vae(model, dtype: torch.dtype) -> AutoencoderKL:
    """model.vae_path: an AutoencoderKL folder, hub id or single file (e.g. the fp16-fix VAE),
    kept in the compute dtype."""
    path = model.vae_path
    local = Path(path).expanduser()
    safetensors = None if model.allow_pickle else True
    try:
        if local.is_file():
            if local.suffix in PICKLE_SUFFIXES and not model.allow_pickle:
                raise TunerError(
                    f"model.vae_path: {local.name} is a pickle file, which can run "
                    "code when loaded; use a .safetensors file or set "
                    "model.allow_pickle: true"
                )
            # Offline, a single file needs its config from a diffusers folder (model.config).
            config = {"config": model.config, "subfolder": "vae"} if model.config else {}
            return AutoencoderKL.from_single_file(str(local), torch_dtype=dtype, **config)
        if local.is_dir():
            subfolder = "vae" if (local / "vae" / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(
                str(local), subfolder=subfolder, torch_dtype=dtype, use_safetensors=safetensors
            )
        if HUB_ID.match(path):
            return AutoencoderKL.from_pretrained(
                path, torch_dtype=dtype, use_safetensors=safetensors
            )
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(
            f"model.vae_path: could not load {path} ({reason}); give an "
            "AutoencoderKL folder, a hub id or a .safetensors file"
        ) from exc
    raise TunerError(
        f"model.vae_path: {path} not found; give an AutoencoderKL folder "
        "(config.json + weights), a hub id such as madebyollin/sdxl-vae-fp16-fix, "
        "or a .safetensors file"
    )


def decode_in_vae_dtype(vae: AutoencoderKL) -> None:
    """The SDXL pipeline hands the VAE latents in the UNet's dtype; an fp32 VAE would reject
    bf16/fp16 input, so cast at its first decoding layer."""
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    first.register_forward_pre_hook(_cast_to_own_dtype)


def _cast_to_own_dtype(module: torch.nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
