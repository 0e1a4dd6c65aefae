"""Flux.2 (black-forest-labs FLUX.2-dev and FLUX.2-klein 4B / 9B): a flow-matching MMDiT (8 or
5 double-stream blocks, then fused single-stream blocks) over 2x2-patchified latents of a
32-channel VAE, conditioned on three hidden-state layers of an LLM stacked per token: Mistral
Small 3.1 (dev: layers 10, 20, 30, under BFL's system prompt) or Qwen3 (klein: 9, 18, 27, chat
template without thinking). Every prompt is padded to the sequence length (512) and the
transformer sees all of it, padding included, as the pipelines give it.

Variants (Components.architecture):
- dev (`flux-2-dev`): guidance-distilled; the embedded guidance value is train.guidance
  (default 1.0, as tuner trains Flux.1 dev). Sampled without CFG.
- klein (`flux-2-klein-4b` / `-9b`): the released klein is step-distilled (`is_distilled`,
  4 steps, no CFG): LoRA on it slowly undoes the distillation, so tuner warns once and trains
  plain LoRA; the base variants (`flux-2-klein-base-4b` / `-9b`, FLUX.2-klein-base-*) train
  cleanly. klein has no guidance embedding: train.guidance is refused.

Latents: what the cache holds is what the transformer denoises: the VAE posterior's mode,
patchified 2x2 (4x the channels at half the side) and normalized by the VAE's batch-norm
statistics, as diffusers' train_dreambooth_lora_flux2*.py and the pipelines' image encoding do.
Timestep shift: the pipelines shift sigmas by exp(mu) with mu from compute_empirical_mu(image
tokens, steps); training uses the same shift at the pipelines' default 50 steps (train.flow.shift
or resolution_shift: false override it).

Single files (flux2-dev.safetensors, flux-2-klein-*.safetensors) hold the transformer alone in
BFL names; diffusers converts them, the rest comes from model.config (default: the release's
repo for the detected variant).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import diffusers
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from tuner.errors import TunerError
from tuner.families import mmdit, quantize, text_encoders
from tuner.families.base import (
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)
from tuner.families.flux2_export import comfy_lora, refuse_unmappable_targets
from tuner.families.loading import (
    index_pipeline,
    load_pipeline_modules,
    model_identity,
    source_kind,
    with_pipeline_class,
)
from tuner.objectives.flow import FlowMatchObjective

log = logging.getLogger("tuner")

DEFAULT_SEQUENCE_LENGTH = 512  # both pipelines' max_sequence_length
SHIFT_STEPS = 50  # the pipelines' default num_inference_steps, for compute_empirical_mu
DEV_REPO = "black-forest-labs/FLUX.2-dev"
KLEIN_REPOS = {"4b": "black-forest-labs/FLUX.2-klein-4B", "9b": "black-forest-labs/FLUX.2-klein-9B"}
# The released klein sizes by context width (three Qwen3 hidden states: 3 x 2560, 3 x 4096).
KLEIN_SIZES = {7680: "4b", 12288: "9b"}


class Flux2Pipeline(diffusers.Flux2Pipeline):
    """diffusers' Flux2Pipeline with the prompt as the first positional argument (its own
    __call__ takes a conditioning image first), as every other pipeline tuner renders with."""

    def __call__(self, prompt=None, image=None, guidance_scale: float | None = 4.0, **kwargs):
        return super().__call__(image=image, prompt=prompt, guidance_scale=guidance_scale, **kwargs)


class Flux2KleinPipeline(diffusers.Flux2KleinPipeline):
    """Flux2KleinPipeline with the prompt first (see Flux2Pipeline)."""

    def __call__(self, prompt=None, image=None, guidance_scale: float = 4.0, **kwargs):
        return super().__call__(image=image, prompt=prompt, guidance_scale=guidance_scale, **kwargs)


PIPELINES = {"Flux2Pipeline": Flux2Pipeline, "Flux2KleinPipeline": Flux2KleinPipeline}


class Flux2Family(FamilyBase):
    spec = FamilySpec(
        name="flux2",
        pipeline="Flux2Pipeline",  # dev; klein models use Flux2KleinPipeline (same LoRA mixin)
        denoiser="transformer",
        # diffusers' train_dreambooth_lora_flux2.py / _klein.py: the double blocks' image
        # attention, and the single blocks' fused qkv+mlp input and output projections.
        # The single blocks' `attn.to_out` is listed per block (default_targets below): the
        # suffix alone would also name the double blocks' to_out ModuleList.
        default_targets=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"),
        default_resolution=1024,
        recognize=Recognition(
            pipelines=tuple(PIPELINES),
            file_keys=("single_stream_modulation.lin.weight",),  # diffusers' own Flux.2 marker
        ),
        export=ExportNaming(
            # The ComfyUI file is kohya-style over BFL's names (comfy_layout); these prefixes
            # name nothing we write but keep kohya-named diffusers-module files readable.
            kohya_prefixes={"transformer": "lora_transformer"},
            kohya_base_version="flux2",
            modelspec_architecture="flux-2-dev",
            lora_key_naming="peft",
            diffusers_alpha="folded",  # Flux2LoraLoaderMixin reads LoraConfig metadata or none
            comfy_layout=comfy_lora,
        ),
        objective="flow",
        text_encoder_lora=False,  # Flux2LoraLoaderMixin loads transformer LoRA only
        quantize=True,
        text_encoder_memory=True,  # Mistral Small 3.1 24B / Qwen3
    )

    def validate(self, recipe) -> None:
        super().validate(recipe)
        mmdit.validate_sequence_length(recipe)
        refuse_unmappable_targets(recipe.adapter)
        refuse_class_generation_that_cannot_fit(recipe)
        kind = getattr(recipe.adapter, "type", "lora")
        if kind != "lora" and "kohya" in recipe.output.formats:
            raise TunerError(
                f"adapter.type: {kind} has no ComfyUI FLUX.2 file in tuner yet (its BFL layout "
                "is written for LoRA); set output.formats=[diffusers] or adapter.type=lora"
            )
        if "guidance" in recipe.train.model_fields_set and is_klein_name(recipe.model.path):
            raise TunerError(
                "train.guidance: FLUX.2 klein has no guidance embedding (the base model "
                "samples with classifier-free guidance, the distilled one without); remove it"
            )

    def load(self, model, dtype: torch.dtype) -> Components:
        if source_kind(model.path) == "file":
            pipe = load_transformer_file(self, model, dtype)
        else:
            shim = as_pipeline(self, pipeline_name(model))
            pipe = quantize.load_pipeline(shim, model, dtype, Flux2Transformer2DModel)
        comps = self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)
        if "-base" not in comps.architecture and is_base_name(model.path):
            comps = replace(comps, architecture=comps.architecture.replace("klein", "klein-base"))
        return replace(comps, sequence_length=DEFAULT_SEQUENCE_LENGTH)

    def configure(self, comps: Components, recipe) -> Components:
        if "guidance" in recipe.train.model_fields_set and not has_guidance(comps.denoiser):
            raise TunerError(
                f"train.guidance: {recipe.model.path} has no guidance embedding (FLUX.2 "
                "klein); remove it"
            )
        if is_distilled(comps):
            log.warning(
                "flux2: %s is the step-distilled klein; LoRA training on it slowly undoes the "
                "distillation (keep runs short, or train on FLUX.2-klein-base-*)",
                recipe.model.path,
            )
        return mmdit.configure_mmdit(comps, recipe, DEFAULT_SEQUENCE_LENGTH, self.spec.name)

    def default_targets(self, denoiser) -> tuple[str, ...]:
        singles = len(denoiser.single_transformer_blocks)
        outs = tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))
        return self.spec.default_targets + outs

    # --- pipelines ------------------------------------------------------------------------
    def build_pipeline(self, comps: Components):
        modules = {
            "transformer": comps.denoiser,
            "vae": comps.vae,
            "scheduler": comps.scheduler,
            **comps.text_encoders,
            **comps.tokenizers,
        }
        if "klein" in comps.architecture:
            return Flux2KleinPipeline(**modules, is_distilled=is_distilled(comps))
        return Flux2Pipeline(**modules)

    def components_from_pipeline(self, pipe, identity: str, dtype=None) -> Components:
        comps = super().components_from_pipeline(pipe, identity, dtype)
        distilled = bool(getattr(pipe.config, "is_distilled", False))
        return replace(comps, architecture=architecture_of(pipe.transformer, distilled))

    # --- data -----------------------------------------------------------------------------
    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt: template, padding to the length, stacked layers.
        embeds, _ = self.build_pipeline(comps).encode_prompt(
            prompt=list(prompts),
            device=mmdit.encoder_device(comps),
            max_sequence_length=comps.sequence_length,
        )
        return {"prompt_embeds": embeds}

    def encode_images(self, comps, pixels, generator=None) -> torch.Tensor:
        """pixels (B, 3, H, W) -> normalized patchified latents (B, 4C, H/16, W/16): the
        posterior's mode (as the pipelines and diffusers' Flux.2 scripts encode images)."""
        vae = comps.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        patches = diffusers.Flux2Pipeline._patchify_latents(latents)
        mean, std = latent_stats(vae, patches)
        return (patches - mean) / std

    def latent_shape(self, comps, size: tuple[int, int]) -> tuple[int, ...]:
        scale = mmdit.vae_scale(comps) * mmdit.LATENT_PATCH
        channels = comps.vae.config.latent_channels * mmdit.LATENT_PATCH**2
        return (channels, size[1] // scale, size[0] // scale)

    def decoded_latent_shape(self, comps, size: tuple[int, int]) -> tuple[int, ...]:
        scale = mmdit.vae_scale(comps)  # the VAE decodes unpatchified latents
        return (comps.vae.config.latent_channels, size[1] // scale, size[0] // scale)

    # --- training -------------------------------------------------------------------------
    def objective(self, comps: Components, train):
        objective = mmdit.flow_objective(comps, train)
        return Flux2Objective.like(objective)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) patchified latents, timesteps: sigma * 1000 -> the velocity in
        the same layout (the transformer's tokens are the latent's pixels, row by row)."""
        transformer, dtype = comps.denoiser, comps.dtype
        b, c, h, w = noisy.shape
        tokens = diffusers.Flux2Pipeline._pack_latents(noisy.to(dtype))
        embeds = cond["prompt_embeds"].to(dtype)
        image_ids = diffusers.Flux2Pipeline._prepare_latent_ids(noisy).to(noisy.device)
        text_ids = diffusers.Flux2Pipeline._prepare_text_ids(embeds).to(noisy.device)
        guidance = None
        if has_guidance(transformer):
            value = comps.guidance if comps.guidance is not None else 1.0
            guidance = torch.full((b,), value, device=noisy.device, dtype=torch.float32)
        out = transformer(
            hidden_states=tokens,
            timestep=(timesteps / 1000).to(dtype),  # the pipelines' convention: sigma
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)


class Flux2Objective(FlowMatchObjective):
    """The flow objective over Flux.2's token grid (the latent is already patchified: one
    token per latent pixel) with the pipelines' empirical mu."""

    @classmethod
    def like(cls, other: FlowMatchObjective) -> Flux2Objective:
        made = cls.__new__(cls)
        made.__dict__.update(other.__dict__)
        made.patch_size = 1
        return made

    def mu(self, latent_shape) -> float:
        return compute_empirical_mu(self.image_seq_len(latent_shape), SHIFT_STEPS)


# Class images are rendered with the transformer and (unless model.text_encoder_quantize or
# text_encoder_offload keeps it off the device) the text encoder on the GPU together.
# GiB of weights (1 GiB = 2^30 bytes): dev's 32.2B transformer per model.quantize, Mistral Small
# 3.1 (24.0B) in bf16, plus ~3 GiB for the VAE, activations and the CUDA context.
DEV_TRANSFORMER_GIB = {"none": 60.0, "int8": 30.0, "nf4": 15.5}
MISTRAL_GIB = 44.7


def refuse_class_generation_that_cannot_fit(recipe) -> None:
    """FLUX.2 dev renders DreamBooth class images with 32B + 24B parameters on one GPU: on a
    card too small for that, say so before anything is downloaded (pre-rendered class images
    in dreambooth.class_dir need no rendering)."""
    db = recipe.dreambooth
    path = recipe.model.path.lower()
    if db is None or not db.with_prior_preservation or is_klein_name(path) or "dev" not in path:
        return
    if db.class_dir and len(list(Path(db.class_dir).expanduser().glob("class-*.png"))) >= (
        db.num_class_images
    ):
        return
    if not torch.cuda.is_available():
        return
    # A quantized or offloaded Mistral encodes the class prompt first and renders without it.
    model = recipe.model
    encoder_off = model.text_encoder_quantize != "none" or model.text_encoder_offload
    needed = DEV_TRANSFORMER_GIB[model.quantize] + (0.0 if encoder_off else MISTRAL_GIB) + 3.0
    have = torch.cuda.get_device_properties(0).total_memory / 2**30
    if have < needed:
        beside = "" if encoder_off else " + Mistral 24B in bf16"
        raise TunerError(
            f"dreambooth: rendering class images with FLUX.2-dev needs ~{needed:.0f} GiB on the "
            f"GPU (transformer{beside}), this one has {have:.0f}; set model.quantize=nf4 and "
            "model.text_encoder_quantize=nf4, or render them on a larger card and set "
            "dreambooth.class_dir"
        )


# --- variants -------------------------------------------------------------------------------
def has_guidance(transformer) -> bool:
    return bool(transformer.config.guidance_embeds)


def architecture_of(transformer, distilled: bool) -> str:
    """modelspec architecture: flux-2-dev, flux-2-klein[-base][-4b|-9b] (toy sizes: no size)."""
    if has_guidance(transformer):
        return "flux-2-dev"
    size = KLEIN_SIZES.get(transformer.config.joint_attention_dim)
    name = "flux-2-klein" if distilled else "flux-2-klein-base"
    return f"{name}-{size}" if size else name


def is_distilled(comps: Components) -> bool:
    return "klein" in comps.architecture and "klein-base" not in comps.architecture


def is_klein_name(path: str) -> bool:
    return "klein" in path.lower()


def is_base_name(path: str) -> bool:
    return bool(re.search(r"klein[-_]base", path.lower()))


def pipeline_name(model) -> str:
    """Which of the two pipelines a source holds, before loading it (offline and for
    builtins: the release names say it)."""
    found = index_pipeline(model)
    if found:
        return found
    return "Flux2KleinPipeline" if is_klein_name(model.path) else "Flux2Pipeline"


def as_pipeline(family, name: str):
    """The family as the loaders see it, with the pipeline class this source needs."""
    if name not in PIPELINES:
        raise TunerError(f"model.path: {name} is not a FLUX.2 text-to-image pipeline")
    return with_pipeline_class(family, PIPELINES[name])


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm statistics over patchified channels, as the pipelines apply them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def file_variant(path: Path) -> tuple[str, str]:
    """(pipeline name, default config repo) of a single transformer file, from its keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        text_in = next((k for k in keys if k.endswith("txt_in.weight")), None)
        width = handle.get_slice(text_in).get_shape()[1] if text_in else 0
    if any("guidance_in." in k for k in keys):
        return "Flux2Pipeline", DEV_REPO
    size = KLEIN_SIZES.get(width, "4b")
    return "Flux2KleinPipeline", KLEIN_REPOS[size]


def load_transformer_file(family, model, dtype: torch.dtype):
    """A BFL-layout single transformer file through diffusers' from_single_file; the text
    encoder, tokenizer, VAE and scheduler from model.config (default: the release's repo)."""
    path = Path(model.path).expanduser()
    if path.suffix != ".safetensors":
        raise TunerError(f"model.path: {path.name}: flux2 single files are read as .safetensors")
    name, repo = file_variant(path)
    config = model.config or repo
    if Path(config).expanduser().is_dir():
        config = str(Path(config).expanduser())
    kwargs = {"config": config, "subfolder": "transformer", "torch_dtype": dtype}
    if model.quantize != "none":
        quantize.require_quantizable(model.quantize)
        kwargs["quantization_config"] = quantize.bnb_config(model.quantize, dtype)
    try:
        transformer = Flux2Transformer2DModel.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(
            f"model.path: could not load {path.name} as a FLUX.2 transformer ({first}); set "
            "model.config to a FLUX.2 diffusers folder or hub id"
        ) from None
    if model.quantize != "none":  # off the GPU before a quantized Mistral loads onto it
        quantize.park(transformer, model.quantize)
    rest = model.model_copy(update={"path": config, "config": None})
    shim = as_pipeline(family, pipeline_name(rest) if source_kind(config) != "hub" else name)
    components = {"transformer": transformer, **text_encoders.quantized_components(rest, dtype)}
    pipe = load_pipeline_modules(shim, rest, dtype, components)
    text_encoders.quantize_loaded(pipe, model, dtype)
    return pipe
