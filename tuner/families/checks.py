"""Recipe checks every family makes from its spec, before any weights load: settings that
cannot apply to the family are refused with one line, never silently ignored."""

from __future__ import annotations

from tuner.errors import TunerError
from tuner.families.base import FamilySpec

# Model options a family may apply (FamilySpec.model_options) and their "off" values.
MODEL_OPTIONS = {"vae_path": None, "prediction_type": None, "drop_t5": False}
# Train keys only some objectives read.
FLOW_ONLY = ("flow", "guidance", "max_sequence_length")
DDPM_ONLY = ("min_snr_gamma",)


def validate_common(spec: FamilySpec, recipe) -> None:
    model, train = recipe.model, recipe.train
    for key, off in MODEL_OPTIONS.items():
        if key not in spec.model_options and getattr(model, key) != off:
            raise TunerError(f"model.{key}: does not apply to {spec.name} models; remove it")
    if model.quantize not in ("none", "fp8") and not spec.quantize:
        raise TunerError(
            f"model.quantize: {model.quantize} is supported for transformer families "
            f"(sd3, flux), not {spec.name}; set model.quantize=none"
        )
    if train.offload_blocks and spec.denoiser == "unet":
        raise TunerError(
            f"train.offload_blocks: block swap applies to transformer families, not the "
            f"{spec.name} UNet; set train.offload_blocks=0"
        )
    if recipe.adapter.text_encoder and not spec.text_encoder_lora:
        raise TunerError(
            f"adapter.text_encoder: text-encoder LoRA is not supported for {spec.name} (its "
            "text encoder outputs are cached, and its pipeline does not load such LoRA); "
            "set it to false"
        )
    if spec.objective == "ddpm":
        for key in FLOW_ONLY:
            if key in train.model_fields_set:
                raise TunerError(
                    f"train.{key}: applies to flow-matching families (sd3, flux); "
                    f"{spec.name} trains with DDPM, remove it"
                )
    else:
        for key in DDPM_ONLY:
            if getattr(train, key) is not None:
                raise TunerError(
                    f"train.{key}: applies to DDPM models only; {spec.name} is "
                    "flow-matching, use train.flow.loss_weighting (none|sigma_sqrt|cosmap)"
                )
