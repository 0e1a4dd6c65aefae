"""Chroma (lodestones/Chroma1-HD and its kin): Flux.1-schnell's MMDiT with the per-block
modulation replaced by one `distilled_guidance_layer` and the CLIP encoder removed. It is
conditioned on a T5-XXL sequence alone, with the T5 attention mask (all padding but the first
token masked), has no guidance embedding and is sampled with real classifier-free guidance.
LoRA files load through FluxLoraLoaderMixin, as ChromaPipeline inherits it."""

from __future__ import annotations

import contextlib

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

from tuner.errors import TunerError
from tuner.families import chroma_file, mmdit
from tuner.families.base import (
    Components,
    ExportNaming,
    FamilyBase,
    FamilySpec,
    Recognition,
    replace,
)
from tuner.families.loading import model_identity, source_kind

DEFAULT_SEQUENCE_LENGTH = 512  # ChromaPipeline's max_sequence_length default


class ChromaFamily(FamilyBase):
    spec = FamilySpec(
        name="chroma",
        pipeline="ChromaPipeline",
        denoiser="transformer",
        # The joint attention of the double blocks (image and text streams) and the q/k/v of
        # the single blocks: the modules Flux trains here, which Chroma's blocks share.
        default_targets=mmdit.JOINT_ATTENTION,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("ChromaPipeline",),
            # BFL-layout checkpoints: Chroma's approximator replaces Flux's per-block
            # modulation (`double_blocks.N.img_mod`), which a Chroma file never has.
            file_keys=("distilled_guidance_layer.",),
            file_keys_absent=("img_mod.",),
        ),
        export=ExportNaming(
            # ComfyUI's Chroma model class subclasses its Flux one, so comfy/lora.py maps
            # Chroma LoRA keys through the Flux branch (`lora_transformer_` and `transformer.`).
            kohya_prefixes=mmdit.MMDIT_KOHYA_PREFIXES,
            kohya_base_version="chroma",
            modelspec_architecture="chroma",
            lora_key_naming="peft",  # FluxLoraLoaderMixin, like Flux
            # ComfyUI reads this layout too (its Flux branch): alpha as `.alpha` tensors.
            diffusers_alpha="tensors",
        ),
        objective="flow",
        text_encoder_lora=False,
        quantize=True,
        text_encoder_memory=True,
    )

    def validate(self, recipe) -> None:
        super().validate(recipe)
        mmdit.validate_sequence_length(recipe)
        if "guidance" in recipe.train.model_fields_set:
            raise TunerError(
                "train.guidance: chroma has no guidance embedding (it samples with "
                "classifier-free guidance, sample.guidance); remove it"
            )

    def load(self, model, dtype: torch.dtype) -> Components:
        if source_kind(model.path) == "file":
            pipe = chroma_file.load_pipeline(self, model, dtype)
            identity = model_identity(self.spec.name, model)
            comps = self.components_from_pipeline(pipe, identity, dtype)
        else:
            comps = mmdit.load_mmdit(self, model, dtype, ChromaTransformer2DModel)
        return replace(comps, sequence_length=DEFAULT_SEQUENCE_LENGTH)

    def configure(self, comps: Components, recipe) -> Components:
        return mmdit.configure_mmdit(comps, recipe, comps.sequence_length, self.spec.name)

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's own encode_prompt: T5 run with the tokenizer's mask, and the mask the
        # transformer gets (padding masked but for its first token), at a fixed length.
        embeds, _, mask, *_ = self.build_pipeline(comps).encode_prompt(
            prompt=prompts,
            device=mmdit.encoder_device(comps),
            do_classifier_free_guidance=False,
            max_sequence_length=comps.sequence_length,
        )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def objective(self, comps: Components, train):
        # The scheduler's own shift settings; mu from the image sequence length exactly as
        # ChromaPipeline computes it (Flux's calculate_shift over the scheduler config).
        return mmdit.flow_objective(comps, train)

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, C, h, w) latents -> the velocity in the same layout."""
        transformer, dtype = comps.denoiser, comps.dtype
        b, c, h, w = noisy.shape
        packed = ChromaPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        embeds = cond["prompt_embeds"].to(dtype)
        image_ids = ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        mask = joint_attention_mask(cond["prompt_attention_mask"].to(dtype), packed.shape[1])
        with single_blocks_get_the_mask(transformer, mask):
            out = transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,  # ChromaPipeline's convention: the model sees sigma
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                attention_mask=mask,
                return_dict=False,
            )[0]
        return ChromaPipeline._unpack_latents(out, h, w, 1)


def joint_attention_mask(text_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The text mask extended over the image tokens, as ChromaPipeline._prepare_attention_mask
    builds it (the text mask's dtype: diffusers 0.42 passes 0/1 floats, which attention adds)."""
    ones = torch.ones(text_mask.shape[0], image_tokens, device=text_mask.device, dtype=torch.bool)
    return torch.cat([text_mask, ones], dim=1)


@contextlib.contextmanager
def single_blocks_get_the_mask(transformer, mask: torch.Tensor):
    """With gradient checkpointing, diffusers' Chroma forward calls the single blocks without
    the attention mask (the double blocks and the plain path pass it); give it back, so that a
    checkpointed step computes what sampling does. The checkpoint function is installed once
    (a stable object for torch.compile) and holds the mask for one call."""
    if not (getattr(transformer, "gradient_checkpointing", False) and torch.is_grad_enabled()):
        yield
        return
    masked = transformer._gradient_checkpointing_func
    if not isinstance(masked, MaskedCheckpoint):
        masked = MaskedCheckpoint(masked)
        transformer._gradient_checkpointing_func = masked
    masked.mask = mask
    try:
        yield
    finally:
        masked.mask = None


class MaskedCheckpoint:
    """diffusers' checkpoint function, adding the attention mask to single-block calls."""

    def __init__(self, plain):
        self.plain, self.mask = plain, None

    def __call__(self, block, *args):
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:
            args = (*args, self.mask)  # (hidden_states, temb, image_rotary_emb) + attention_mask
        return self.plain(block, *args)
