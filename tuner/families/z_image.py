"""Z-Image (Tongyi-MAI Z-Image-Turbo, Z-Image): a 6B single-stream DiT trained by flow
matching, conditioned on Qwen3-4B's second-to-last hidden states over the chat-templated
prompt, with the 16-channel Flux VAE.

Conventions, as in ZImagePipeline and diffusers' train_dreambooth_lora_z_image.py: the
transformer takes lists (one (C, 1, h, w) latent and one (L_i, D) caption embedding per sample,
L_i the prompt's own token count: it pads captions to multiples of 32 itself, with a learned pad
token, and places the image's RoPE positions after them); its timestep is 1 - sigma; it predicts
x0 - noise, which the pipeline negates. `predict` returns that negation: the velocity
noise - x0, the flow objective's target.

Text cache: encode_prompt returns one variable-length tensor per prompt, while the cache and the
batch collation hold fixed-shape tensors. Each prompt is stored zero-padded to the sequence
length (train.max_sequence_length, default 512: the pipeline's) with a boolean `prompt_mask`;
`predict` cuts every embedding back to its masked length, so the transformer sees exactly what
the pipeline gives it (Qwen3 is causal and masked: padding never changes the kept states).

Z-Image-Turbo is step-distilled (8 transformer calls, no classifier-free guidance). A LoRA
trained on it directly slowly undoes the distillation: 8-step samples lose detail as a run goes
on. The remedies are training on the base model (Tongyi-MAI/Z-Image) and applying the LoRA to
Turbo, or, as ai-toolkit does, training Turbo with a de-distillation "training adapter" merged
in and removed at inference. tuner has no such adapter: on Turbo it trains plain LoRA (fine for
short style/subject runs) and warns once; full fine-tuning and distillation-preserving training
are not supported.

Single files: the released checkpoint is the transformer alone (original names); the Qwen3
encoder, tokenizer, VAE and scheduler come from model.config (default: the Turbo repo).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel

from tuner.adapters import formats
from tuner.errors import TunerError
from tuner.families import mmdit, quantize, text_encoders
from tuner.families.base import (
    UNET_ATTENTION,
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)
from tuner.families.loading import load_pipeline_modules, model_identity, source_kind

log = logging.getLogger("tuner")

DEFAULT_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length
# RoPE positions: captions take axis-0 positions 1..L (L padded to 32), the image the next one;
# the released transformer has 1536 of them.
MAX_SEQUENCE_LENGTH = 1024
COMFY_PREFIX = "diffusion_model."
TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"  # where a single file's other components come from


def comfy_lora(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """A diffusers-format Z-Image LoRA -> the layout ComfyUI maps for Z-Image.

    ComfyUI (comfy/lora.py, model_lora_keys_unet, the `comfy.model_base.Lumina2` branch that
    Z-Image models take) builds its names from comfy/utils.py `z_image_to_diffusers`: every
    diffusers module name of the transformer (`layers.N.attention.to_q`, `...to_out.0`,
    `feed_forward.w1`, `adaLN_modulation.0`, the noise/context refiners, ...), accepted as
    `diffusion_model.<name>`, and mapped onto the original checkpoint's weights (to_q/to_k/to_v
    onto slices of its fused `attention.qkv`). diffusers' Z-Image loader reads the same names
    (`_convert_non_diffusers_z_image_lora_to_diffusers`). Weights are lora_A / lora_B with the
    PEFT scale alpha / rank folded into lora_B, and no `.alpha` tensors: the file then means the
    same thing to every loader (ComfyUI scales by 1 without an alpha).
    """
    configs = formats.lora_configs(metadata)
    out: dict[str, torch.Tensor] = {}
    downs = {}
    for key, tensor in state.items():
        match = formats.DIFFUSERS_LORA.match(key)
        if match is None or match["component"] != "transformer":
            raise TunerError(
                f"cannot convert key {key!r} to ComfyUI's Z-Image layout (only plain transformer "
                "LoRA has one); export the diffusers format instead"
            )
        if match["kind"] in formats.DOWN_KINDS:
            downs[match["module"]] = tensor
            out[f"{COMFY_PREFIX}{match['module']}.lora_A.weight"] = tensor.contiguous()
    for key, tensor in state.items():
        match = formats.DIFFUSERS_LORA.match(key)
        module = match["module"]
        if match["kind"] in formats.DOWN_KINDS:
            continue
        rank = downs[module].shape[0]
        scale = formats.kohya_alpha(configs.get("transformer", {}), module, rank) / rank
        up = tensor if scale == 1.0 else tensor * scale
        out[f"{COMFY_PREFIX}{module}.lora_B.weight"] = up.contiguous()
    return out


class ZImageFamily(FamilyBase):
    block_lists = (
        "noise_refiner",
        "context_refiner",
        "layers",
    )  # block swap: the blocks in the order they run
    spec = FamilySpec(
        name="z-image",
        pipeline="ZImagePipeline",
        denoiser="transformer",
        # diffusers' train_dreambooth_lora_z_image.py default: the attention projections of
        # every block (main layers and the noise / context refiners).
        default_targets=UNET_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("ZImagePipeline",),
            # diffusers' own Z-Image marker (Lumina 2 has adaLN_modulation.1 there); a Z-Image
            # ControlNet file holds it under `control_layers.`, next to control_all_x_embedder.
            file_keys=("layers.0.adaLN_modulation.0.weight",),
            file_keys_absent=("control_all_x_embedder",),
        ),
        export=ExportNaming(
            # kohya-named Z-Image files (lora_unet_<diffusers module>) are read back with these;
            # the file we write is ComfyUI's layout (comfy_layout).
            kohya_prefixes={"transformer": "lora_unet"},
            kohya_base_version="z-image",
            modelspec_architecture="z-image-turbo",
            lora_key_naming="peft",
            # alpha / rank folded into the up weights: right for every loader of this layout.
            diffusers_alpha="folded",
            comfy_layout=comfy_lora,
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        text_encoder_memory=True,
    )

    def validate(self, recipe) -> None:
        super().validate(recipe)
        train = recipe.train
        if "guidance" in train.model_fields_set:
            raise TunerError(
                "train.guidance: Z-Image embeds no guidance value (Turbo is sampled without "
                "guidance, the base model with classifier-free guidance); remove it"
            )
        length = train.max_sequence_length
        if length is not None and length > MAX_SEQUENCE_LENGTH:
            raise TunerError(
                f"train.max_sequence_length: {length} is more than the {MAX_SEQUENCE_LENGTH} "
                "Qwen3 tokens tuner allows for Z-Image (the pipeline's default is 512)"
            )

    def load(self, model, dtype: torch.dtype) -> Components:
        if source_kind(model.path) == "file":
            comps = load_single_file(self, model, dtype)
        else:
            comps = mmdit.load_mmdit(self, model, dtype, ZImageTransformer2DModel)
        return replace(
            comps,
            architecture="z-image-turbo" if is_turbo(model.path) else "z-image",
            sequence_length=DEFAULT_SEQUENCE_LENGTH,
        )

    def configure(self, comps: Components, recipe) -> Components:
        mmdit.check_sizes(comps, recipe.data, self.spec.name)
        if is_turbo(recipe.model.path):
            log.warning(
                "z-image: %s is the step-distilled Turbo model; LoRA training on it slowly "
                "undoes the distillation (keep runs short, or train on Tongyi-MAI/Z-Image)",
                recipe.model.path,
            )
        length = recipe.train.max_sequence_length or DEFAULT_SEQUENCE_LENGTH
        return replace(comps, sequence_length=length, identity=f"{comps.identity}:qwen-{length}")

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt (chat template, hidden_states[-2], masked tokens).
        # It rewrites the list it is given in place, so it gets a copy.
        embeds, _ = self.build_pipeline(comps).encode_prompt(
            prompt=list(prompts),
            device=mmdit.encoder_device(comps),
            do_classifier_free_guidance=False,
            max_sequence_length=comps.sequence_length,
        )
        return pad_embeddings(embeds, comps.sequence_length)

    def objective(self, comps: Components, train):
        return mmdit.flow_objective(comps, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) latents, timesteps: sigma * 1000 -> the velocity (B, C, h, w)."""
        dtype = comps.dtype
        embeds = cond["prompt_embeds"].to(dtype)
        mask = cond["prompt_mask"]
        if mask.device.type == "meta":  # `tuner plan`: no values, every token kept (upper bound)
            lengths = [mask.shape[1]] * mask.shape[0]
        else:
            lengths = mask.sum(dim=1).tolist()  # one host sync per step
        captions = [embeds[i, :n] for i, n in enumerate(lengths)]
        latents = list(noisy.to(dtype).unsqueeze(2).unbind(dim=0))
        out = comps.denoiser(
            latents,
            (1000 - timesteps) / 1000,  # ZImagePipeline's convention: the model sees 1 - sigma
            captions,
            return_dict=False,
        )[0]
        return -torch.stack(out, dim=0).squeeze(2)


def load_single_file(family, model, dtype: torch.dtype) -> Components:
    """A single-file Z-Image checkpoint holds the transformer only (original names: fused
    attention.qkv; diffusers converts them). Qwen3, its tokenizer, the VAE and the scheduler come
    from model.config (a diffusers folder or hub id; default: the Turbo repo's)."""
    config = model.config or TURBO_REPO
    kind = model.quantize
    path = str(Path(model.path).expanduser())
    if kind != "none":
        quantize.require_quantizable(kind)
        transformer = quantize.load_quantized(
            ZImageTransformer2DModel, model.model_copy(update={"config": config}), kind, dtype
        )
    else:
        try:
            transformer = ZImageTransformer2DModel.from_single_file(
                path, config=config, subfolder="transformer", torch_dtype=dtype
            )
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise TunerError(
                f"model.path: could not load {Path(path).name} as a Z-Image transformer "
                f"({first}); set model.config to a Z-Image diffusers folder or hub id"
            ) from None
    rest = model.model_copy(update={"path": config, "config": None})
    encoders = text_encoders.quantized_components(rest, dtype)
    pipe = load_pipeline_modules(family, rest, dtype, {"transformer": transformer, **encoders})
    text_encoders.quantize_loaded(pipe, model, dtype)
    if kind != "none":
        quantize.park(pipe.transformer, kind)
    return family.components_from_pipeline(pipe, model_identity(family.spec.name, model), dtype)


def pad_embeddings(embeds: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Per-prompt (L_i, D) embeddings -> (B, length, D) zero-padded, and the (B, length) mask
    of real tokens."""
    first = embeds[0]
    padded = first.new_zeros(len(embeds), length, first.shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=first.device)
    for row, embed in enumerate(embeds):
        padded[row, : len(embed)] = embed
        mask[row, : len(embed)] = True
    return {"prompt_embeds": padded, "prompt_mask": mask}


def is_turbo(path: str) -> bool:
    """The released distilled model is named Z-Image-Turbo (hub id, folder or file name)."""
    return "turbo" in path.lower()
