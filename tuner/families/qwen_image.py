"""Qwen-Image: a 20B dual-stream MMDiT trained by flow matching over packed 2x2 patches of a
16-channel video-style VAE (one frame), conditioned on the last hidden states of Qwen2.5-VL-7B
run over the pipeline's chat template (its system prompt dropped), with a padding mask.

Cached per prompt: `prompt_embeds` padded with zeros to the sequence length and the
`prompt_embeds_mask` saying which tokens are real. `predict` trims a batch to its longest prompt
and drops an all-true mask, exactly as QwenImagePipeline.encode_prompt does for that batch, so
the transformer sees what sampling gives it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

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
from tuner.families.loading import model_identity, source_kind

DEFAULT_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length
MAX_SEQUENCE_LENGTH = 1024  # what its encode_prompt accepts
# Prefixes single-file transformer checkpoints carry before the diffusers module names
# (ComfyUI's split files have none; full ComfyUI checkpoints have the first).
FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# What model.config names for a single transformer file's other parts, per family.
RELEASE_REPOS = {"qwen-image": "Qwen/Qwen-Image", "qwen-image-edit": "Qwen/Qwen-Image-Edit"}


class QwenImageFamily(FamilyBase):
    spec = FamilySpec(
        name="qwen-image",
        pipeline="QwenImagePipeline",
        denoiser="transformer",
        # diffusers' train_dreambooth_lora_qwen_image.py: the image stream's attention.
        default_targets=UNET_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("QwenImagePipeline",),
            # The dual-stream block's image modulation (nn.Sequential(SiLU, Linear)); Flux and
            # HunyuanVideo checkpoints name theirs `img_mod.lin` / `img_mod.linear`. Qwen-Image
            # 2.1 (another architecture) is told apart by its text-input norm.
            file_keys=("transformer_blocks.0.img_mod.1.weight",),
            file_keys_absent=("txt_in.text_norm",),
        ),
        export=ExportNaming(
            # kohya/musubi-tuner names (`lora_unet_<module path with _>`, lora_down/lora_up/
            # alpha): ComfyUI maps `lora_unet_` + every `diffusion_model.` weight of any model
            # (comfy/lora.py model_lora_keys_unet), and diffusers' Qwen loader reads them.
            kohya_prefixes={"transformer": "lora_unet"},
            kohya_base_version="qwen_image",
            modelspec_architecture="qwen-image",
            lora_key_naming="peft",
            # alpha / rank folded into the up weights: right for every loader of this layout.
            diffusers_alpha="folded",
            comfy_file="kohya",
        ),
        objective="flow",
        text_encoder_lora=False,  # QwenImageLoraLoaderMixin loads transformer LoRA only
        quantize=True,
        text_encoder_memory=True,
    )

    def meta_trace(self):
        return every_token_kept()  # the prompt encoder reads mask lengths a meta tensor lacks

    def validate(self, recipe) -> None:
        super().validate(recipe)
        length = recipe.train.max_sequence_length
        if length is not None and length > MAX_SEQUENCE_LENGTH:
            raise TunerError(
                f"train.max_sequence_length: {length} is more than the {MAX_SEQUENCE_LENGTH} "
                "tokens QwenImagePipeline accepts"
            )
        if "guidance" in recipe.train.model_fields_set:
            raise TunerError(
                "train.guidance: Qwen-Image embeds no guidance value (it uses true CFG when "
                "sampling); remove it"
            )

    def load(self, model, dtype: torch.dtype) -> Components:
        if source_kind(model.path) == "file":
            pipe = load_transformer_file(self, model, dtype)
        else:
            pipe = quantize.load_pipeline(self, model, dtype, QwenImageTransformer2DModel)
        comps = self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)
        return replace(comps, sequence_length=DEFAULT_SEQUENCE_LENGTH)

    def configure(self, comps: Components, recipe) -> Components:
        check_sizes(comps, recipe.data)
        length = recipe.train.max_sequence_length or DEFAULT_SEQUENCE_LENGTH
        # Cached embeddings are padded to this length: part of the cache identity.
        return replace(comps, sequence_length=length, identity=f"{comps.identity}:qwen-{length}")

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encode_prompt (template, dropped system prefix, last hidden
        states), padded to the fixed sequence length with its mask: (B, L, D) and (B, L)."""
        length = comps.sequence_length or DEFAULT_SEQUENCE_LENGTH
        embeds, mask = self.build_pipeline(comps).encode_prompt(
            prompt=prompts, device=mmdit.encoder_device(comps), max_sequence_length=length
        )
        b, n, _ = embeds.shape
        if mask is None:  # every prompt was as long as the longest
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        return {
            "prompt_embeds": torch.nn.functional.pad(embeds, (0, 0, 0, length - n)),
            "prompt_embeds_mask": torch.nn.functional.pad(mask, (0, length - n)),
        }

    def encode_images(self, comps, pixels, generator=None) -> torch.Tensor:
        """pixels (B, 3, H, W) -> normalized latents (B, 16, H/8, W/8): the VAE sees one frame,
        and latents are (z - latents_mean) / latents_std, as the pipeline decodes them."""
        vae = comps.vae
        frames = pixels.to(vae.device, vae.dtype).unsqueeze(2)
        latents = vae.encode(frames).latent_dist.sample(generator=generator)[:, :, 0]
        mean, std = latent_stats(vae, latents)
        return (latents - mean) / std

    def latent_shape(self, comps, size: tuple[int, int]) -> tuple[int, ...]:
        config = comps.vae.config  # a causal video VAE: one frame, x2 per temporal stage
        scale = 2 ** len(config.temperal_downsample)
        return (config.z_dim, size[1] // scale, size[0] // scale)

    def objective(self, comps: Components, train):
        # The scheduler's dynamic shift: mu from the image sequence length, as the pipeline.
        return mmdit.flow_objective(comps, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, 16, h, w) latents -> the velocity in the same layout."""
        dtype = comps.dtype
        b, c, h, w = noisy.shape
        embeds, mask = batch_prompts(cond, batch.get("cond"))
        packed = QwenImagePipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        out = comps.denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,  # QwenImagePipeline's convention: the model sees sigma
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds.to(dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            attention_kwargs={},
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(out, h, w, 1)[:, :, 0]


@contextlib.contextmanager
def every_token_kept(*pipelines):
    """encode_prompt splits the encoder's states by the mask's lengths, values a meta tensor
    lacks; while planning every prompt keeps every token (the upper bound)."""
    originals = {cls: cls._extract_masked_hidden for cls in pipelines or (QwenImagePipeline,)}

    def kept(original):
        def full_length(self, hidden_states, mask):
            if hidden_states.device.type != "meta":
                return original(self, hidden_states, mask)
            return tuple(hidden_states.unbind(dim=0))

        return full_length

    for cls, original in originals.items():
        cls._extract_masked_hidden = kept(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls._extract_masked_hidden = original


def batch_prompts(cond: dict, on_host: dict | None):
    """The batch's embeddings trimmed to its longest prompt, and the mask (None when every
    prompt is that long), as encode_prompt returns them for these prompts together. The
    lengths are read from the batch's host copy when there is one (no device sync)."""
    lengths = (on_host or cond)["prompt_embeds_mask"].sum(dim=1)
    if lengths.device.type == "meta":  # `tuner plan`: no values, every prompt full length
        return cond["prompt_embeds"], None
    longest = int(lengths.max())
    embeds = cond["prompt_embeds"][:, :longest]
    mask = None if bool((lengths == longest).all()) else cond["prompt_embeds_mask"][:, :longest]
    return embeds, mask


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def vae_scale(vae) -> int:
    return 2 ** len(vae.temperal_downsample)  # QwenImagePipeline.vae_scale_factor


def check_sizes(comps: Components, data) -> None:
    multiple = vae_scale(comps.vae) * mmdit.LATENT_PATCH
    sizes = [("data.resolution", data.resolution)]
    sizes += [
        (f"data.datasets.{i}.resolution", e.resolution)
        for i, e in enumerate(data.datasets)
        if e.resolution
    ]
    if data.bucket_options is not None:
        sizes.append(("data.buckets.step", data.bucket_options.step))
    for key, value in sizes:
        if value % multiple:
            raise TunerError(
                f"{key}: {value} is not a multiple of {multiple}, which qwen-image needs "
                f"(VAE x8 and 2x2 patches); use {max(multiple, value // multiple * multiple)}"
            )


def load_transformer_file(family, model, dtype: torch.dtype, pipeline_class=QwenImagePipeline):
    """A single-file transformer checkpoint (e.g. ComfyUI's qwen_image_bf16.safetensors): the
    transformer through diffusers' from_single_file (Qwen-Image's single-file mapping is the
    identity, so checkpoint-level prefixes are stripped first), the text encoder, VAE,
    tokenizer and scheduler from model.config (the Qwen pipelines have no from_single_file)."""
    from safetensors.torch import load_file

    path = Path(model.path).expanduser()
    if path.suffix != ".safetensors":
        raise TunerError(
            f"model.path: {path.name}: qwen-image single files are read as .safetensors only"
        )
    if not model.config:
        raise TunerError(
            f"model.path: {path.name} holds the transformer only; set model.config to a "
            f"{family.spec.name} diffusers folder or hub id (e.g. "
            f"{RELEASE_REPOS.get(family.spec.name, 'Qwen/Qwen-Image')}) for the text encoder, VAE "
            "and tokenizer"
        )
    state = {}
    for key, tensor in load_file(str(path)).items():
        for prefix in FILE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        state[key] = tensor
    kwargs = {"config": model.config, "subfolder": "transformer", "torch_dtype": dtype}
    if model.quantize != "none":
        quantize.require_quantizable(model.quantize)
        kwargs["quantization_config"] = quantize.bnb_config(model.quantize, dtype)
    try:
        transformer = QwenImageTransformer2DModel.from_single_file(state, **kwargs)
        config_path = model.config
        if Path(config_path).expanduser().is_dir():
            config_path = str(Path(config_path).expanduser())
        encoders = text_encoders.quantized_components(
            model.model_copy(update={"path": config_path}), dtype
        )
        pipe = pipeline_class.from_pretrained(
            config_path,
            transformer=transformer,
            torch_dtype=dtype,
            revision=model.revision,
            **encoders,
        )
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(f"model.path: could not load single file {path.name} ({first})") from None
    if model.quantize != "none":
        quantize.park(pipe.transformer, model.quantize)
    return pipe
