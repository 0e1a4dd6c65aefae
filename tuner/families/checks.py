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
    from tuner.adapters.lycoris import check_options

    model, train = recipe.model, recipe.train
    check_options(recipe.adapter, spec)
    for key, off in MODEL_OPTIONS.items():
        if key not in spec.model_options and getattr(model, key) != off:
            raise TunerError(f"model.{key}: does not apply to {spec.name} models; remove it")
    if model.quantize not in ("none", "fp8") and not spec.quantize:
        raise TunerError(
            f"model.quantize: {model.quantize} is supported for transformer families "
            f"(sd3, flux), not {spec.name}; set model.quantize=none"
        )
    validate_text_encoder_memory(spec, recipe)
    if train.offload_blocks and spec.denoiser == "unet":
        raise TunerError(
            f"train.offload_blocks: block swap applies to transformer families, not the "
            f"{spec.name} UNet; set train.offload_blocks=0"
        )
    if train.offload_blocks and model.quantize in ("nf4", "int8"):
        # Block swap copies plain or fp8 weight tensors; a bitsandbytes layer's packed weight
        # and its quantization state would not survive the move.
        raise TunerError(
            f"train.offload_blocks: block swap does not combine with model.quantize="
            f"{model.quantize} (bitsandbytes layers); use model.quantize=fp8 or none with it, "
            "or set train.offload_blocks=0"
        )
    if recipe.adapter.text_encoder and not spec.text_encoder_lora:
        raise TunerError(
            f"adapter.text_encoder: text-encoder LoRA is not supported for {spec.name} (its "
            "text encoder outputs are cached, and its pipeline does not load such LoRA); "
            "set it to false"
        )
    if train.channels_last and spec.denoiser != "unet":
        raise TunerError(
            f"train.channels_last: applies to UNet families (sd15, sd2, sdxl); {spec.name}'s "
            "transformer has no convolutions to speed up; remove it"
        )
    check_controls(spec, recipe)
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


def validate_text_encoder_memory(spec: FamilySpec, recipe) -> None:
    """model.text_encoder_quantize / text_encoder_offload shrink the encoders of the caching
    phase; they cannot apply where there is no large encoder, where the encoders train, or
    (offload) where prompts are encoded every step."""
    model, data = recipe.model, recipe.data
    keys = [
        key
        for key, on in (
            ("text_encoder_quantize", model.text_encoder_quantize != "none"),
            ("text_encoder_offload", model.text_encoder_offload),
        )
        if on
    ]
    if not keys:
        return
    if not spec.text_encoder_memory:
        raise TunerError(
            f"model.{keys[0]}: applies to families with a T5 or LLM text encoder (sd3, flux, "
            f"chroma, qwen-image, z-image, flux2, hidream); {spec.name}'s CLIP encoders are "
            "small, remove it"
        )
    if recipe.adapter.text_encoder:
        raise TunerError(
            f"model.{keys[0]}: the text encoders train (adapter.text_encoder: true), so they "
            "must stay whole and in full precision; remove one of the two"
        )
    if len(keys) == 2:
        raise TunerError(
            "model.text_encoder_offload: not combined with text_encoder_quantize (a quantized "
            "encoder fits the GPU whole for caching); choose one of the two"
        )
    if model.text_encoder_offload and not (data.cache and not data.shuffle_tags):
        why = "data.shuffle_tags: true" if data.cache else "data.cache: false"
        raise TunerError(
            f"model.text_encoder_offload: prompts are encoded every step ({why}), so the "
            "encoder would be streamed from the CPU every step; cache the prompts or remove it"
        )


def check_controls(spec: FamilySpec, recipe) -> None:
    """Paired data goes to editing families only, and editing families need it."""
    for index, entry in enumerate(recipe.data.datasets):
        key = "control_dir" if entry.control_dir else "control_column"
        if entry.paired and not spec.controls:
            raise TunerError(
                f"data.datasets.{index}.{key}: {spec.name} does not take reference images; "
                "remove it, or train an editing family (flux-kontext, qwen-image-edit)"
            )
        if spec.controls and not entry.paired:
            raise TunerError(
                f"data.datasets.{index}: {spec.name} trains on (reference, target) pairs; "
                "set control_dir (a folder of same-stem reference images) or control_column"
            )
    if spec.controls and recipe.dreambooth is not None:
        raise TunerError(
            f"dreambooth: {spec.name} trains on (reference, target) pairs, and DreamBooth "
            "folders have none; use data.datasets[] with control_dir"
        )
    if recipe.sample.controls and not spec.controls:
        raise TunerError(f"sample.controls: {spec.name} does not take reference images; remove it")
    prompts, controls = recipe.sample.prompts, recipe.sample.controls
    if spec.controls and prompts and len(controls) != len(prompts):
        raise TunerError(
            f"sample.controls: {spec.name} edits a reference image; give one per prompt "
            f"({len(prompts)} prompts, {len(controls)} controls)"
        )


def check_reference_counts(family, comps, items) -> None:
    """Every pair has as many references as the loaded pipeline reads, and all pairs the same
    number (a batch stacks the references position by position)."""
    counts = sorted({len(item.controls) for item in items if item.controls})
    if not counts:
        return
    most = family.max_references(comps)
    if most is not None and counts[-1] > most:
        example = next(i for i in items if len(i.controls) == counts[-1])
        raise TunerError(
            f"{example.record.key}: {len(example.controls)} reference images, but "
            f"{comps.architecture or family.spec.name} reads {most}; give one per target, or "
            "train a model that reads several (Qwen-Image-Edit-2509/2511: QwenImageEditPlus)"
        )
    if len(counts) > 1:
        raise TunerError(
            f"data: pairs with {counts[0]} and with {counts[-1]} reference images; every pair "
            "of a run needs the same number"
        )
