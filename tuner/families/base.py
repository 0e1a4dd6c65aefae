"""The family interface: everything that differs between SD1.x/2.x, SDXL, SD3 and Flux.

The training loop, data pipeline, sampler and exporters only talk to this interface, so adding a
family means adding one file here, never a branch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Components:
    """A loaded model, split into the parts the trainer treats differently."""

    family: Family
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    scheduler: Any
    identity: str  # stable name of the weights, part of every cache key
    extra: dict[str, Any] = field(default_factory=dict)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, **self.text_encoders}


class Family:
    """Base class; subclasses set the class attributes and implement the hooks."""

    name: str = ""
    pipeline_class: Any = None
    denoiser_name: str = "unet"  # the pipeline attribute that holds the denoiser
    default_targets: tuple[str, ...] = ()
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    default_resolution: int = 512
    kohya_prefixes: dict[str, str] = {"unet": "lora_unet", "text_encoder": "lora_te"}
    modelspec_architecture: str = ""
    # LoRA key naming of saved adapters (see adapters.adapter_state).
    lora_key_naming: str = "diffusers"
    # kohya's `ss_base_model_version`, which webui front ends use to sort adapters by base.
    kohya_base_version: str = ""
    # Cached text-encoder outputs that are per prompt (everything encode_prompts returns).
    # Per-sample conditioning that comes from the data (sizes, crops) is read from the batch.

    # ---- loading -------------------------------------------------------------------------
    def load(self, model, dtype: torch.dtype) -> Components:
        raise NotImplementedError

    def build_pipeline(self, comps: Components):
        """A diffusers pipeline sharing the loaded modules (no copies)."""
        modules = {
            self.denoiser_name: comps.denoiser,
            "vae": comps.vae,
            "scheduler": comps.scheduler,
            **comps.text_encoders,
            **comps.tokenizers,
        }
        return self.pipeline_class(**modules, **self.pipeline_extras())

    def configure(self, comps: Components, recipe) -> None:
        """Apply recipe settings beyond `model` that change encoding (e.g. a text sequence
        length, which must then be part of comps.identity) or that the family cannot support.
        Called once right after load, before anything is cached."""

    def pipeline_extras(self) -> dict:
        return {}

    def components_from_pipeline(self, pipe, identity: str) -> Components:
        names = [
            n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if hasattr(pipe, n)
        ]
        text_encoders = {n: getattr(pipe, n) for n in names if getattr(pipe, n) is not None}
        tok_names = [n.replace("text_encoder", "tokenizer") for n in text_encoders]
        return Components(
            family=self,
            denoiser=getattr(pipe, self.denoiser_name),
            vae=pipe.vae,
            text_encoders=text_encoders,
            tokenizers={n: getattr(pipe, n) for n in tok_names},
            scheduler=pipe.scheduler,
            identity=identity,
        )

    # ---- encoding (done once and cached when possible) ----------------------------------
    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(
        self, comps: Components, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """pixels in [-1, 1], NCHW -> scaled latents ready for the denoiser."""
        vae = comps.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # ---- training ------------------------------------------------------------------------
    def objective(self, comps: Components, train):
        raise NotImplementedError

    def predict(
        self,
        comps: Components,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
        batch: dict,
    ) -> torch.Tensor:
        raise NotImplementedError

    # ---- adapters ------------------------------------------------------------------------
    def save_lora(
        self, directory: Path, layers: dict[str, dict], metadata: dict[str, dict], weight_name: str
    ) -> None:
        """layers: component name ('unet', 'text_encoder', ...) -> diffusers-format state dict."""
        kwargs = {f"{name}_lora_layers": sd for name, sd in layers.items()}
        kwargs.update({f"{name}_lora_adapter_metadata": md for name, md in metadata.items()})
        self.pipeline_class.save_lora_weights(
            str(directory), weight_name=weight_name, safe_serialization=True, **kwargs
        )


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Padded, truncated ids at the tokenizer's full length (77 for CLIP)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
