"""Qwen-Image-Edit (and Edit Plus, the 2509 / 2511 releases): Qwen-Image's transformer editing
reference images. Two things differ from Qwen-Image, both as the pipelines do them:

- the references' latents (the VAE posterior's mode, normalized) are packed like the image's
  and appended after the target tokens, with one `img_shapes` entry each; the prediction of
  the reference tokens is dropped, so the loss is on the target tokens only;
- the Qwen2.5-VL prompt encoder reads the references too (QwenImageEditPipeline: the reference
  at its ~1024^2 VAE size, one `<|image_pad|>` in the template; Edit Plus: each reference at
  ~384^2 behind a "Picture i:" marker), so a prompt is cached per (caption, references).

Each reference is resized by the pipeline's own rule (about 1024^2 pixels at its own aspect
ratio, multiples of 32: FamilySpec.reference_area), whatever the output size, because that is
what the pipelines give the model at inference. LoRA files are Qwen-Image's.
"""

from __future__ import annotations

import re

import torch
from diffusers import (
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus

from tuner.errors import TunerError
from tuner.families import mmdit, quantize
from tuner.families.base import (
    UNET_ATTENTION,
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)
from tuner.families.checks import validate_common
from tuner.families.loading import index_pipeline, model_identity, source_kind, with_pipeline_class
from tuner.families.qwen_image import (
    QwenImageFamily,
    batch_prompts,
    check_sizes,
    every_token_kept,
    latent_stats,
    load_transformer_file,
)

PIPELINES = {
    "QwenImageEditPipeline": QwenImageEditPipeline,
    "QwenImageEditPlusPipeline": QwenImageEditPlusPipeline,
}
PLUS_NAMES = re.compile(r"plus|2509|2511")  # the Edit Plus releases: Qwen-Image-Edit-2509 ...


class QwenImageEditFamily(FamilyBase):
    spec = FamilySpec(
        name="qwen-image-edit",
        pipeline="QwenImageEditPipeline",
        denoiser="transformer",
        default_targets=UNET_ATTENTION,
        default_resolution=1024,
        # Edit checkpoints have Qwen-Image's keys: single files need model.family.
        recognize=Recognition(pipelines=tuple(PIPELINES)),
        export=ExportNaming(
            kohya_prefixes={"transformer": "lora_unet"},
            kohya_base_version="qwen_image",
            modelspec_architecture="qwen-image-edit",
            lora_key_naming="peft",
            diffusers_alpha="folded",
            comfy_file="kohya",
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        text_encoder_memory=True,
        controls=1,
        reference_area=edit_plus.VAE_IMAGE_SIZE,
        prompt_reads_references=True,
    )

    # Qwen-Image's steps, shared as functions: the latents and objective are the same.
    encode_images = QwenImageFamily.encode_images
    latent_shape = QwenImageFamily.latent_shape
    objective = QwenImageFamily.objective

    def meta_trace(self):
        return every_token_kept(*PIPELINES.values())

    def validate(self, recipe) -> None:
        validate_common(self.spec, recipe)
        if recipe.train.max_sequence_length is not None:
            raise TunerError(
                "train.max_sequence_length: the Qwen-Image-Edit pipelines do not cut prompts "
                "(the reference's image tokens are part of them); remove it"
            )
        if "guidance" in recipe.train.model_fields_set:
            raise TunerError(
                "train.guidance: Qwen-Image-Edit embeds no guidance value (it uses true CFG "
                "when sampling); remove it"
            )

    def load(self, model, dtype: torch.dtype) -> Components:
        shim = with_pipeline_class(self, PIPELINES[pipeline_name(model)])
        if source_kind(model.path) == "file":
            pipe = load_transformer_file(self, model, dtype, shim.spec.pipeline_class)
        else:
            pipe = quantize.load_pipeline(shim, model, dtype, QwenImageTransformer2DModel)
        return self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)

    def configure(self, comps: Components, recipe) -> Components:
        check_sizes(comps, recipe.data)
        return comps

    def max_references(self, comps: Components) -> int | None:
        """QwenImageEditPipeline reads one reference; Edit Plus any number."""
        return None if is_plus(comps) else 1

    def components_from_pipeline(self, pipe, identity: str, dtype=None) -> Components:
        comps = super().components_from_pipeline(pipe, identity, dtype)
        plus = isinstance(pipe, QwenImageEditPlusPipeline)
        return replace(
            comps,
            tokenizers={**comps.tokenizers, "processor": pipe.processor},
            architecture="qwen-image-edit-plus" if plus else "qwen-image-edit",
        )

    def build_pipeline(self, comps: Components):
        modules = {
            "transformer": comps.denoiser,
            "vae": comps.vae,
            "scheduler": comps.scheduler,
            **comps.text_encoders,
            **comps.tokenizers,
        }
        cls = QwenImageEditPlusPipeline if is_plus(comps) else QwenImageEditPipeline
        return cls(**modules)

    # --- data -----------------------------------------------------------------------------
    def encode_prompts(self, comps, prompts, references=None) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt, one prompt at a time (as sampling calls it: the
        VL encoder's batch padding would change its states), each with its references resized
        by the pipeline's rule; stacked with zero padding and a mask: (B, L, D) and (B, L)."""
        pipe = self.build_pipeline(comps)
        device = mmdit.encoder_device(comps)
        if device.type == "meta":
            return planned_prompts(pipe, prompts, references, device)
        if not references:
            raise TunerError(
                f"{self.spec.name}: each prompt is encoded with its reference images "
                "(encode_prompts(..., references=...))"
            )
        rows = []
        for index, prompt in enumerate(prompts):
            images = prompt_images(pipe, references[index])
            embeds, _ = pipe.encode_prompt(prompt=[prompt], image=images, device=device)
            rows.append(embeds[0])
        longest = max(row.shape[0] for row in rows)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=rows[0].device)
        for index, row in enumerate(rows):
            mask[index, : row.shape[0]] = 1
        embeds = torch.stack(
            [torch.nn.functional.pad(r, (0, 0, 0, longest - len(r))) for r in rows]
        )
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def encode_controls(self, comps, pixels) -> torch.Tensor:
        """References -> normalized latents of the posterior's mode (_encode_vae_image)."""
        vae = comps.vae
        frames = pixels.to(vae.device, vae.dtype).unsqueeze(2)
        latents = vae.encode(frames).latent_dist.mode()[:, :, 0]
        mean, std = latent_stats(vae, latents)
        return (latents - mean) / std

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, 16, h, w) target latents; the references' latents come from the batch
        (cached, or encoded here from their pixels) -> the velocity of the target only."""
        dtype = comps.dtype
        b, c, h, w = noisy.shape
        embeds, mask = batch_prompts(cond, batch.get("cond"))
        references = reference_latents(self, comps, batch, noisy)
        pack = QwenImagePipeline._pack_latents
        tokens = pack(noisy.to(dtype), b, c, h, w)
        streams = [tokens] + [pack(r.to(dtype), b, c, *r.shape[-2:]) for r in references]
        shapes = [(1, h // 2, w // 2)] + [
            (1, r.shape[-2] // 2, r.shape[-1] // 2) for r in references
        ]
        out = comps.denoiser(
            hidden_states=torch.cat(streams, dim=1),
            timestep=timesteps / 1000,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds.to(dtype),
            img_shapes=[shapes] * b,
            attention_kwargs={},
            return_dict=False,
        )[0]
        target = out[:, : tokens.shape[1]]  # the reference tokens' output is not trained
        return QwenImagePipeline._unpack_latents(target, h, w, 1)[:, :, 0]


def is_plus(comps: Components) -> bool:
    return comps.architecture.endswith("-plus")


def pipeline_name(model) -> str:
    """Which of the two pipelines a source holds: its model_index.json, else (builtins, single
    files, offline) the release's name."""
    found = index_pipeline(model)
    if found is None:
        plus = PLUS_NAMES.search(f"{model.path} {model.config or ''}".lower())
        found = "QwenImageEditPlusPipeline" if plus else "QwenImageEditPipeline"
    if found not in PIPELINES:
        raise TunerError(f"model.path: {found} is not a Qwen-Image-Edit pipeline")
    return found


def prompt_images(pipe, references: list) -> list:
    """The reference images as the pipeline hands them to the VL encoder: Edit, the first at
    its VAE size (~1024^2); Edit Plus, each at ~384^2."""
    if isinstance(pipe, QwenImageEditPlusPipeline):
        area = edit_plus.CONDITION_IMAGE_SIZE
    else:
        area, references = edit_plus.VAE_IMAGE_SIZE, references[:1]
    resized = []
    for image in references:
        width, height = edit_plus.calculate_dimensions(area, image.size[0] / image.size[1])
        resized.append(pipe.image_processor.resize(image, height, width))
    return resized


class OnCpu:
    """A processor whose calls make their tensors on the CPU whatever the default device."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        with torch.device("cpu"):
            return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def image_tokens(pipe, image) -> int:
    """How many tokens the VL encoder gives a reference: its patch grid after the processor's
    own resize, merged 2x2 (the processor computes it, on the CPU)."""
    images = pipe.processor.image_processor
    with torch.device("cpu"):
        grid = images(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // images.merge_size**2


def planned_prompts(pipe, prompts, references, device) -> dict[str, torch.Tensor]:
    """`tuner plan` (meta device: no pixels to encode): each reference's image tokens stand in
    as as many plain special tokens, so the language model runs on a sequence of the real
    length (the vision tower's activations are left out; its weights are counted)."""
    # the processor makes its tensors from numpy: on the CPU, not on the meta device
    object.__setattr__(pipe, "processor", OnCpu(pipe.processor))
    template, embeds = pipe.prompt_template_encode, []
    for index, prompt in enumerate(prompts):
        images = prompt_images(pipe, references[index] if references else [])
        fill = "<|endoftext|>" * sum(image_tokens(pipe, image) for image in images)
        if "<|image_pad|>" in template:  # Edit: the reference's place in the template
            pipe.prompt_template_encode = template.replace("<|image_pad|>", fill)
        else:  # Edit Plus: the references before the instruction
            prompt = fill + prompt
        embeds.append(pipe.encode_prompt(prompt=[prompt], image=None, device=device)[0])
    embeds = torch.cat(embeds)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def reference_latents(family, comps, batch, noisy) -> list[torch.Tensor]:
    if "control_latents" in batch:
        return [latents.to(noisy.device) for latents in batch["control_latents"]]
    with torch.no_grad():
        return [
            family.encode_controls(comps, pixels.to(noisy.device)).float()
            for pixels in batch["control_pixels"]
        ]
