"""What SD3/3.5 and Flux.1 share, as helpers their family classes call: an MMDiT transformer
trained by flow matching, T5 text encoding whose outputs are cached, LoRA on the joint attention,
and an optional bitsandbytes-quantized transformer."""

from __future__ import annotations

import torch

from tuner.errors import TunerError
from tuner.families import quantize
from tuner.families.base import Components, replace
from tuner.families.loading import model_identity
from tuner.objectives.common import LossSpec
from tuner.objectives.flow import FlowMatchObjective, build_flow_objective

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
# OneTrainer's layout (`lora_transformer_<diffusers module path>`, lora_down/lora_up/alpha):
# ComfyUI maps it for both Flux and SD3 (next to the diffusers-style `transformer.` keys),
# diffusers' Flux loader reads it, and it keeps a trained alpha.
MMDIT_KOHYA_PREFIXES = {
    "transformer": "lora_transformer",
    "text_encoder": "lora_te1",
    "text_encoder_2": "lora_te2",
}
MAX_SEQUENCE_LIMIT = 512  # what the SD3 and Flux pipelines accept
LATENT_PATCH = 2  # the transformer sees 2x2 latent patches


def load_mmdit(
    family, model, dtype: torch.dtype, transformer_cls, leave_out: tuple[str, ...] = ()
) -> Components:
    """The pipeline's modules from any source, the transformer quantized if asked."""
    pipe = quantize.load_pipeline(family, model, dtype, transformer_cls, leave_out)
    return family.components_from_pipeline(pipe, model_identity(family.spec.name, model), dtype)


def validate_sequence_length(recipe) -> None:
    length = recipe.train.max_sequence_length
    if length is not None and length > MAX_SEQUENCE_LIMIT:
        raise TunerError(
            f"train.max_sequence_length: {length} is more than the "
            f"{MAX_SEQUENCE_LIMIT} tokens the pipeline accepts"
        )


def configure_mmdit(comps: Components, recipe, default_length: int, name: str) -> Components:
    """Sizes the VAE and patches allow, the T5 sequence length (part of the cache identity:
    cached prompt embeddings depend on it) and the embedded guidance value."""
    check_sizes(comps, recipe.data, name)
    length = recipe.train.max_sequence_length or default_length
    return replace(
        comps,
        sequence_length=length,
        guidance=recipe.train.guidance,
        identity=f"{comps.identity}:t5-{length}",
    )


def check_sizes(comps: Components, data, name: str) -> None:
    multiple = vae_scale(comps) * LATENT_PATCH
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
                f"{name} needs (VAE x8 and 2x2 patches); use "
                f"{max(multiple, value // multiple * multiple)}"
            )


def vae_scale(comps: Components) -> int:
    return 2 ** (len(comps.vae.config.block_out_channels) - 1)


def flow_objective(comps: Components, train) -> FlowMatchObjective:
    """The recipe's flow settings over the model's scheduler defaults (its shift, and whether
    it shifts by resolution)."""
    config = comps.scheduler.config
    return build_flow_objective(
        comps.scheduler,
        train.flow,
        noise_offset=train.noise_offset,
        default_shift=config.get("shift", 1.0),
        default_resolution_shift=bool(config.get("use_dynamic_shifting", False)),
        loss=LossSpec.of(train),
    )


def encoder_device(comps: Components) -> torch.device:
    return next(comps.text_encoders["text_encoder"].parameters()).device
