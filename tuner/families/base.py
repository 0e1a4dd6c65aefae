"""The family interface: everything that differs between model families, and nothing else.

A family is one class in one file of this package. It declares what it is as a frozen
`FamilySpec` (name, pipeline, how a model is recognised, LoRA targets, export naming) and
implements the `Family` protocol: the only calls the loop, data, sampling and export make.
`FamilyBase` gives the defaults most families share; shared MMDiT / flow-matching behaviour is
in helpers (`families/mmdit.py`) that families call, not in a base class chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from tuner.objectives.common import Objective
    from tuner.recipe import ModelSection, Recipe, TrainSection

CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Recognition:
    """How a family recognises a model without loading it.

    pipelines: `_class_name` values of a diffusers `model_index.json` (folder or hub config).
    unet_config: for pipelines several families share, a test on the denoiser's config.
    file_keys / file_keys_absent: a single-file checkpoint is this family's when some key
    contains one of `file_keys` and no key contains any of `file_keys_absent`.
    """

    pipelines: tuple[str, ...]
    unet_config: Callable[[Mapping[str, Any]], bool] | None = None
    file_keys: tuple[str, ...] = ()
    file_keys_absent: tuple[str, ...] = ()

    def matches_index(self, pipeline: str, denoiser_config: Callable[[], Mapping]) -> bool:
        if pipeline not in self.pipelines:
            return False
        return self.unet_config is None or self.unet_config(denoiser_config())

    def matches_keys(self, keys: set[str]) -> bool:
        def found(marker: str) -> bool:
            return any(marker in key for key in keys)

        return any(map(found, self.file_keys)) and not any(map(found, self.file_keys_absent))


@dataclass(frozen=True)
class ExportNaming:
    """How this family's adapters are named in files other programs read.

    kohya_prefixes: pipeline component -> kohya module prefix (`lora_unet`, `lora_te1`, ...).
    kohya_base_version: kohya's `ss_base_model_version`, which webui front ends sort by.
    modelspec_architecture: the default `modelspec.architecture` (a loaded model may refine it,
        e.g. Flux dev / schnell; see Components.architecture).
    lora_key_naming: "diffusers" (UNet-era `lora.down`) or "peft" (`lora_A`), what the
        pipeline's loader reads back without dropping layers.
    comfy_file: which file we write that ComfyUI loads at the trained strength ("kohya" or
        "diffusers"); the model card and README name it.
    comfy_layout: for a family whose ComfyUI names are not `<kohya prefix>_<module>`: a function
        (diffusers-format state dict, its metadata) -> the tensors of the kohya/ComfyUI file,
        written instead of the kohya layout (None: kohya names from kohya_prefixes).
    diffusers_alpha: where the diffusers-layout file keeps alpha, so that every program
        reading that layout applies the trained strength. "metadata": only in diffusers'
        LoraConfig metadata (the UNet families: diffusers' SD loaders refuse `.alpha` keys, and
        ComfyUI does not map that layout's UNet attention names, so it reads the kohya file);
        "tensors": `<module>.alpha` tensors and no LoraConfig metadata (Flux: ComfyUI reads
        them, and diffusers' Flux loader takes them but refuses them beside the metadata);
        "folded": alpha / rank multiplied into the up weights, metadata at scale 1 (SD3:
        diffusers' SD3 loader refuses `.alpha` keys; ComfyUI then reads scale 1, which is right).
    """

    kohya_prefixes: Mapping[str, str]
    kohya_base_version: str
    modelspec_architecture: str
    lora_key_naming: Literal["diffusers", "peft"] = "diffusers"
    comfy_file: Literal["kohya", "diffusers"] = "kohya"
    comfy_layout: Callable[[dict, dict], dict] | None = None
    diffusers_alpha: Literal["metadata", "tensors", "folded"] = "metadata"


@dataclass(frozen=True)
class FamilySpec:
    """What a family is, as data."""

    name: str
    pipeline: str  # the diffusers pipeline class name
    denoiser: Literal["unet", "transformer"]
    default_targets: tuple[str, ...]
    default_resolution: int
    recognize: Recognition
    export: ExportNaming
    text_encoder_targets: tuple[str, ...] = CLIP_ATTENTION
    text_encoder_lora: bool = True  # whether the pipeline's loader reads text-encoder LoRA back
    objective: Literal["ddpm", "flow"] = "ddpm"
    quantize: bool = False  # whether `model.quantize` (bitsandbytes NF4/int8) applies
    # whether model.text_encoder_quantize / text_encoder_offload apply: families with a T5 or
    # LLM encoder, which is what does not fit beside the denoiser (CLIP-only families: no)
    text_encoder_memory: bool = False
    # Reference images per sample: 0 for text-to-image families (control_dir/control_column
    # refused); editing families need at least one (datasets without controls refused).
    controls: int = 0
    # How the pipeline sizes a reference image: 0, at the output size (FluxKontext, when told
    # not to auto-resize), so training gives it its target's size and crop window; N, at about
    # N pixels with the reference's own aspect ratio whatever the output size (QwenImageEdit:
    # 1024^2, multiples of 32), so training resizes the whole reference that way too.
    reference_area: int = 0
    # Whether the text encoder reads the reference images as well (Qwen-Image-Edit's VL
    # encoder): prompts are then encoded and cached per (caption, references), and
    # encode_prompts takes `references` (per prompt, the reference images as PIL).
    prompt_reads_references: bool = False
    # model-section options beyond the source this family applies (others are refused)
    model_options: tuple[str, ...] = ()

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


@dataclass
class Components:
    """A loaded model, split into the parts the trainer treats differently, with the settings
    that encoding and prediction need (resolved by `Family.configure`)."""

    family: Family
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    scheduler: Any
    identity: str  # stable name of the weights and encoding settings, part of every cache key
    dtype: torch.dtype = torch.float32  # the compute dtype of the frozen weights
    architecture: str = ""  # modelspec architecture of this exact model
    sequence_length: int | None = None  # text tokens per prompt, for T5-style encoders
    guidance: float | None = None  # the guidance value a guidance-distilled denoiser embeds
    text_encoder_quantize: str = "none"  # how the encoders were loaded (model.text_encoder_*)
    text_encoder_offload: bool = False
    # sample prompts encoded in the caching phase: encode_prompt call -> its outputs (CPU)
    encoded_prompts: dict = dataclasses.field(default_factory=dict)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, **self.text_encoders}

    def modules(self) -> dict[str, nn.Module]:
        return {self.family.spec.denoiser: self.denoiser, **self.frozen_modules()}


@runtime_checkable
class Family(Protocol):
    """What the loop, the data pipeline, sampling and export call. Nothing else."""

    spec: ClassVar[FamilySpec]

    def validate(self, recipe: Recipe) -> None:
        """Refuse recipe settings this family cannot apply (one TunerError line), using the
        recipe alone: run by `tuner check` and before `tuner train` writes anything."""

    def load(self, model: ModelSection, dtype: torch.dtype) -> Components: ...

    def configure(self, comps: Components, recipe: Recipe) -> Components:
        """Settings that depend on the loaded weights (e.g. sizes the VAE allows, the text
        sequence length). Returns new Components; the family object is never changed."""

    def blocks(self, denoiser) -> list[nn.Module]:
        """The denoiser's repeated transformer blocks in the order they run (block swap)."""

    def text_encoding_phase(self, comps: Components, device):
        """The context the cache encodes prompts in (FamilyBase: every text encoder on device;
        hidream: none moved, encode_prompts places one encoder at a time)."""

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-prompt conditioning tensors (batch first): what the cache stores."""

    def encode_images(
        self, comps: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """pixels in [-1, 1], NCHW -> scaled latents ready for the denoiser."""

    def latent_shape(self, comps: Components, size: tuple[int, int]) -> tuple[int, ...]:
        """The shape (without batch) of encode_images' latent for an image of size (width,
        height): the cache rejects entries of any other shape."""

    def objective(self, comps: Components, train: TrainSection) -> Objective: ...

    def predict(
        self,
        comps: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        batch: dict,
    ) -> torch.Tensor: ...

    def build_pipeline(self, comps: Components) -> Any:
        """A diffusers pipeline sharing the loaded modules (no copies)."""

    def components_from_pipeline(
        self, pipe: Any, identity: str, dtype: torch.dtype | None = None
    ) -> Components:
        """Components over a pipeline's modules; dtype: the compute dtype (default: the
        pipeline's)."""

    def save_lora(
        self,
        directory: Path,
        layers: dict[str, dict[str, torch.Tensor]],
        metadata: dict[str, dict],
        weight_name: str,
    ) -> None:
        """layers: component name ('unet', 'text_encoder', ...) -> state dict in the family's
        key naming; written with the pipeline class's own save_lora_weights."""

    def load_lora(self, pipe: Any, file: Path, adapter_name: str) -> None:
        """Load one adapter file with the pipeline's own load_lora_weights."""


class FamilyBase:
    """Defaults shared by most families; a family overrides what differs."""

    spec: ClassVar[FamilySpec]
    pipeline_extras: ClassVar[dict[str, Any]] = {}  # fixed pipeline arguments (no watermark...)
    # The denoiser's repeated transformer-block lists, in the order they run (block swap).
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")
    encoders_one_at_a_time: ClassVar[bool] = False  # caching holds one text encoder at a time

    def validate(self, recipe: Recipe) -> None:
        from tuner.families.checks import validate_common

        validate_common(self.spec, recipe)

    def configure(self, comps: Components, recipe: Recipe) -> Components:
        return comps

    def meta_trace(self):
        """The context `tuner plan` traces this family's modules in on the meta device: a
        family whose forward reads values (data-dependent routing) swaps in a shape-faithful
        stand-in here."""
        return contextlib.nullcontext()

    def max_references(self, comps: Components) -> int | None:
        """How many reference images one sample may have (None: any number)."""
        return self.spec.controls

    def default_targets(self, denoiser: nn.Module) -> tuple[str, ...]:
        """LoRA targets when the recipe names none (a family whose defaults depend on the
        model's depth lists them from the denoiser)."""
        return self.spec.default_targets

    def blocks(self, denoiser) -> list[nn.Module]:
        """The denoiser's transformer blocks in the order they run (empty: a UNet)."""
        if self.spec.denoiser == "unet":
            return []
        lists = [getattr(denoiser, name, None) for name in self.block_lists]
        return [block for blocks in lists if blocks is not None for block in blocks]

    def text_encoding_phase(self, comps: Components, device):
        """The context prompts are cached in: the text encoders on `device` (a family whose
        encoders cannot sit there together overrides it and places them in encode_prompts);
        streamed block by block when model.text_encoder_offload is set."""
        from tuner.families.text_encoders import encoding_phase

        return encoding_phase(comps, device)

    def encode_images(self, comps, pixels, generator=None) -> torch.Tensor:
        vae = comps.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def encode_controls(self, comps, pixels) -> torch.Tensor:
        """Reference images -> latents as editing pipelines encode them: the posterior's mode
        (no noise), scaled and shifted like encode_images."""
        vae = comps.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def latent_shape(self, comps, size: tuple[int, int]) -> tuple[int, ...]:
        config = comps.vae.config  # an AutoencoderKL: x2 per level after the first
        scale = 2 ** (len(config.block_out_channels) - 1)
        return (config.latent_channels, size[1] // scale, size[0] // scale)

    def decoded_latent_shape(self, comps, size: tuple[int, int]) -> tuple[int, ...]:
        """The latent the VAE's decode takes (a family that patchifies latents for its
        denoiser decodes them unpatchified)."""
        return self.latent_shape(comps, size)

    def build_pipeline(self, comps: Components):
        modules = {
            self.spec.denoiser: comps.denoiser,
            "vae": comps.vae,
            "scheduler": comps.scheduler,
            **comps.text_encoders,
            **comps.tokenizers,
        }
        return self.spec.pipeline_class(**modules, **self.pipeline_extras)

    def components_from_pipeline(self, pipe, identity: str, dtype=None) -> Components:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        text_encoders = {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}
        tokenizer_names = [n.replace("text_encoder", "tokenizer") for n in text_encoders]
        return Components(
            family=self,
            denoiser=getattr(pipe, self.spec.denoiser),
            vae=pipe.vae,
            text_encoders=text_encoders,
            tokenizers={n: getattr(pipe, n) for n in tokenizer_names},
            scheduler=pipe.scheduler,
            identity=identity,
            dtype=dtype or pipe.dtype,
            architecture=self.spec.export.modelspec_architecture,
        )

    def save_lora(self, directory, layers, metadata, weight_name) -> None:
        kwargs = {f"{name}_lora_layers": sd for name, sd in layers.items()}
        kwargs.update({f"{name}_lora_adapter_metadata": md for name, md in metadata.items()})
        self.spec.pipeline_class.save_lora_weights(
            str(directory), weight_name=weight_name, safe_serialization=True, **kwargs
        )

    def load_lora(self, pipe, file: Path, adapter_name: str) -> None:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)


def replace(comps: Components, **changes) -> Components:
    """A copy of comps with some fields changed (configure returns one)."""
    return dataclasses.replace(comps, **changes)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Padded, truncated ids at the tokenizer's full length (77 for CLIP)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
