"""HiDream-I1 (Full, Dev, Fast): a 17B sparse DiT (16 dual-stream + 32 single-stream blocks
whose image FFNs are mixtures of experts: 4 routed, top 2, plus a shared expert) trained by flow
matching on 2x2 patches of the Flux VAE's 16-channel latents. Conditioning, as
HiDreamImagePipeline.encode_prompt computes it: CLIP-L and CLIP-G pooled projections
(concatenated, 2048), T5-XXL's last hidden states, and the hidden states of every Llama-3.1-8B
layer (each transformer block reads the layer `llama_layers` names), all at 128 tokens padded
with no text mask. Timesteps are sigma * 1000; the model predicts x0 - noise, which the
pipeline negates (`predict` returns the velocity noise - x0, the flow objective's target).

Variants (Components.architecture): Full samples with flow UniPC at shift 3 and CFG; Dev and
Fast are guidance- and step-distilled (no CFG, 28 / 16 steps, flow Euler at shift 6 / 3). The
variant comes from the model's name, else its scheduler. The objective uses the variant's
shift. A LoRA trained on Dev or Fast slowly undoes the distillation (as with Z-Image Turbo):
tuner trains plain LoRA on them and warns once; train on Full for long runs.

MoE: training runs the transformer in train mode, where diffusers routes tokens through the
experts differentiably (its inference path, `moe_infer`, runs under no_grad: expert LoRA would
get no gradient there) and returns patch-layout outputs that `predict` turns back into
latents. The router (`ff_i.gate`, a bare weight, not a Linear) is never a LoRA target.

Single files: diffusers' from_single_file reads HiDream transformer checkpoints (the released
and ComfyUI files: original names, optionally `model.diffusion_model.`-prefixed) but the
pipeline has none, so the four text encoders, VAE, tokenizers and scheduler come from
model.config (a diffusers folder or hub id).

Memory: the four encoders (CLIP-L 0.12B, CLIP-G 0.69B, T5-XXL 4.76B, Llama 8.03B: 27 GB in
bf16) never share the GPU with the transformer; `text_encoding_phase` puts them there one at a
time while prompts are cached, so the largest (Llama, 16 GB bf16) bounds the caching phase.
With model.text_encoder_quantize all four load quantized (text_encoder_4 too, from the folder or
meta-llama's repo); with model.text_encoder_offload each is streamed layer by layer in its turn.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import re
from pathlib import Path

import torch
from diffusers import HiDreamImageTransformer2DModel

from tuner.adapters import formats
from tuner.devices import on_device
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
from tuner.families.loading import load_pipeline_modules, model_identity, source_kind

log = logging.getLogger("tuner")

DEFAULT_SEQUENCE_LENGTH = 128  # HiDreamImagePipeline.__call__'s max_sequence_length
MAX_SEQUENCE_LENGTH = 218  # the pipeline cuts CLIP there (its CLIPs have 248 positions)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
# diffusers' train_dreambooth_lora_hidream.py default (`--lora_layers`): the image-stream
# attention of every block (to_q_t ... of the text stream are not matched by these suffixes).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out")
# Optional FFN targets (adapter.targets): the shared expert, the routed experts, the text FFN.
ROUTER = "ff_i.gate"  # MoEGate: its `weight` is an nn.Parameter; PEFT cannot and must not wrap it
COMFY_PREFIX = "diffusion_model."
VARIANTS = ("full", "dev", "fast")
LLAMA_REPO = "meta-llama/Meta-Llama-3.1-8B-Instruct"  # text_encoder_4 of every HiDream-I1


def comfy_lora(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The diffusers-format HiDream LoRA -> the layout ComfyUI maps for HiDream and diffusers'
    HiDream loader reads too: `diffusion_model.<module>.lora_A/lora_B.weight`.

    ComfyUI (comfy/lora.py model_lora_keys_unet) accepts, for every `diffusion_model.<name>
    .weight` of any model, `lora_unet_<name with _>` and `diffusion_model.<name>`, and for
    comfy.model_base.HiDream also `transformer.<name>` and `lycoris_<name with _>`; its HiDream
    module names (comfy/ldm/hidream/model.py) are the original checkpoint's, which are
    diffusers' (diffusers' single-file mapping for HiDream only strips a prefix). diffusers'
    HiDreamImageLoraLoaderMixin turns `diffusion_model.` keys into `transformer.` ones. The
    file we get is already alpha-folded (diffusers_alpha="folded"), so no `.alpha` tensors:
    ComfyUI scales by 1, diffusers' loader would refuse keys without `lora` in them.
    """
    out = {}
    for key, tensor in state.items():
        match = formats.DIFFUSERS_LORA.match(key)
        if match is None or match["component"] != "transformer":
            raise TunerError(
                f"cannot convert key {key!r} to ComfyUI's HiDream layout (only plain transformer "
                "LoRA has one); export the diffusers format instead"
            )
        kind = "lora_A" if match["kind"] in formats.DOWN_KINDS else "lora_B"
        out[f"{COMFY_PREFIX}{match['module']}.{kind}.weight"] = tensor.contiguous()
    return out


class HiDreamFamily(FamilyBase):
    block_lists = (
        "double_stream_blocks",
        "single_stream_blocks",
    )  # block swap: the blocks in the order they run
    spec = FamilySpec(
        name="hidream",
        pipeline="HiDreamImagePipeline",
        denoiser="transformer",
        default_targets=DEFAULT_TARGETS,
        default_resolution=1024,
        recognize=Recognition(
            pipelines=("HiDreamImagePipeline",),
            # diffusers' own single-file marker for HiDream (CHECKPOINT_KEY_NAMES["hidream"]).
            file_keys=("double_stream_blocks.0.block.adaLN_modulation.1.bias",),
        ),
        export=ExportNaming(
            # kohya names (lora_unet_<module>) ComfyUI maps for every model; the file we write
            # is the `diffusion_model.` layout (comfy_layout), which diffusers reads as well.
            kohya_prefixes={"transformer": "lora_unet"},
            kohya_base_version="hidream",
            modelspec_architecture="hidream-i1-full",
            lora_key_naming="peft",
            # HiDream's loader refuses `.alpha` keys: alpha / rank folded into the up weights.
            diffusers_alpha="folded",
            comfy_layout=comfy_lora,
        ),
        objective="flow",
        text_encoder_lora=False,  # HiDreamImageLoraLoaderMixin loads transformer LoRA only
        quantize=True,
        text_encoder_memory=True,  # T5-XXL, Llama-3.1-8B
    )

    encoders_one_at_a_time = True  # see text_encoding_phase

    def meta_trace(self):
        from tuner.families.moe_trace import balanced_routing

        return balanced_routing()  # routing reads values a meta tensor lacks

    def validate(self, recipe) -> None:
        super().validate(recipe)
        length = recipe.train.max_sequence_length
        if length is not None and length > MAX_SEQUENCE_LENGTH:
            raise TunerError(
                f"train.max_sequence_length: {length} is more than the {MAX_SEQUENCE_LENGTH} "
                "tokens HiDreamImagePipeline gives its CLIP encoders (its default is 128)"
            )
        if "guidance" in recipe.train.model_fields_set:
            raise TunerError(
                "train.guidance: HiDream embeds no guidance value (Full samples with "
                "classifier-free guidance, Dev and Fast without); remove it"
            )
        check_router_untouched(recipe.adapter)

    def load(self, model, dtype: torch.dtype) -> Components:
        kind = source_kind(model.path)
        if kind == "file":
            pipe = load_single_file(self, model, dtype)
        elif kind == "builtin":
            pipe = quantize.load_pipeline(self, model, dtype, HiDreamImageTransformer2DModel)
        else:
            pipe = load_with_llama(self, model, dtype)
        comps = self.components_from_pipeline(pipe, model_identity(self.spec.name, model), dtype)
        variant = detect_variant(model.path, comps.scheduler)
        return replace(
            comps, architecture=f"hidream-i1-{variant}", sequence_length=DEFAULT_SEQUENCE_LENGTH
        )

    def configure(self, comps: Components, recipe) -> Components:
        mmdit.check_sizes(comps, recipe.data, self.spec.name)
        check_patch_budget(comps, recipe.data)
        if comps.architecture != "hidream-i1-full":
            log.warning(
                "hidream: %s is %s, guidance- and step-distilled; LoRA training on it slowly "
                "undoes the distillation (keep runs short, or train on HiDream-I1-Full), and "
                "it samples without CFG (sample.guidance 1)",
                recipe.model.path,
                comps.architecture,
            )
        length = recipe.train.max_sequence_length or DEFAULT_SEQUENCE_LENGTH
        return replace(comps, sequence_length=length, identity=f"{comps.identity}:text-{length}")

    def components_from_pipeline(self, pipe, identity: str, dtype=None) -> Components:
        comps = super().components_from_pipeline(pipe, identity, dtype)
        encoders = {name: getattr(pipe, name) for name in TEXT_ENCODERS}
        tokenizers = {name.replace("text_encoder", "tokenizer"): None for name in TEXT_ENCODERS}
        tokenizers = {name: getattr(pipe, name) for name in tokenizers}
        follow_grad_mode(comps.denoiser)
        return replace(comps, text_encoders=encoders, tokenizers=tokenizers)

    def build_pipeline(self, comps: Components):
        pipe = super().build_pipeline(comps)
        # The pipeline samples at (default_sample_size x VAE)^2 pixels of area whatever size is
        # asked; it hard-codes 128, the released max_resolution (1024^2). Tied to the model's
        # own max_resolution, so that a toy model samples at the area it holds.
        pipe.default_sample_size = comps.denoiser.config.max_resolution[0]
        return pipe

    def text_encoding_phase(self, comps: Components, device):
        """Prompts are cached with one encoder at a time on the device (encode_prompts moves
        them): all four in bf16 are 27 GB, Llama alone 16 GB."""
        return encoding_device(device)

    def encode_prompts(self, comps: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoders and settings (its encode_prompt, one encoder at a time):
        pooled CLIP-L + CLIP-G (B, 2048), T5 (B, L, 4096) and every Llama layer, batch first
        for the cache (B, layers, L, 4096); encode_prompt returns that one layers first."""
        pipe = self.build_pipeline(comps)
        length = comps.sequence_length or DEFAULT_SEQUENCE_LENGTH
        device = ENCODE_DEVICE.get() or mmdit.encoder_device(comps)
        encoders = comps.text_encoders
        # Offloaded: each encoder's blocks are streamed to the device in turn (Llama's 32
        # layers one by one) instead of the whole encoder visiting it.
        place = text_encoders.streamed if comps.text_encoder_offload else on_device
        with place([encoders["text_encoder"], encoders["text_encoder_2"]], device):
            pooled = torch.cat(
                [
                    pipe._get_clip_prompt_embeds(
                        pipe.tokenizer, pipe.text_encoder, prompts, length, device
                    ),
                    pipe._get_clip_prompt_embeds(
                        pipe.tokenizer_2, pipe.text_encoder_2, prompts, length, device
                    ),
                ],
                dim=-1,
            )
        with place([encoders["text_encoder_3"]], device):
            t5 = pipe._get_t5_prompt_embeds(prompts, length, device)
        with place([encoders["text_encoder_4"]], device):
            llama = pipe._get_llama3_prompt_embeds(prompts, length, device)
        return {
            "pooled_prompt_embeds": pooled,
            "prompt_embeds_t5": t5,
            "prompt_embeds_llama3": llama.transpose(0, 1).contiguous(),
        }

    def objective(self, comps: Components, train):
        # The variant's own shift (Full's UniPC keeps it as flow_shift), fixed: HiDream's
        # pipeline passes the scheduler a constant mu, and neither scheduler shifts by size.
        config = comps.scheduler.config
        shift = config.get("flow_shift") if "flow_shift" in config else config.get("shift", 1.0)
        from tuner.objectives.flow import build_flow_objective

        return build_flow_objective(
            comps.scheduler,
            train.flow,
            noise_offset=train.noise_offset,
            default_shift=float(shift),
            default_resolution_shift=False,
        )

    def predict(self, comps, noisy, timesteps, cond, batch) -> torch.Tensor:
        """noisy: (B, 16, h, w) latents, timesteps: sigma * 1000 -> the velocity (B, 16, h, w)."""
        dtype, transformer = comps.dtype, comps.denoiser
        h, w = noisy.shape[-2:]
        out = transformer(
            hidden_states=noisy.to(dtype),
            timesteps=timesteps,  # HiDreamImagePipeline's convention: sigma * 1000
            encoder_hidden_states_t5=cond["prompt_embeds_t5"].to(dtype),
            encoder_hidden_states_llama3=cond["prompt_embeds_llama3"].to(dtype).transpose(0, 1),
            pooled_embeds=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]
        return -latent_layout(transformer, out, h, w)


def follow_grad_mode(transformer) -> None:
    """Run the transformer in train mode exactly when gradients are on, whatever its flag.

    Its MoE and output layout depend on `training`: the train-mode path routes tokens through
    the experts differentiably and returns patch layout; the eval path (what sampling needs,
    and what HiDreamImagePipeline expects) runs the experts under no_grad. The loop sets a
    trained module to train mode and pipelines share that module, so the mode is set per call
    (and put back after it)."""
    if getattr(transformer, "_tuner_follows_grad_mode", False):
        return

    def before(module, args, kwargs):
        module._tuner_saved_mode = module.training
        module.train(torch.is_grad_enabled())

    def after(module, args, kwargs, output):
        module.train(module._tuner_saved_mode)

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, with_kwargs=True, always_call=True)
    transformer._tuner_follows_grad_mode = True


def latent_layout(transformer, out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The transformer's output as (B, C, h, w) latents. In train mode diffusers returns patch
    layout (B, C, tokens, p*p), the tokens padded to max_seq for non-square images."""
    if out.ndim == 4 and out.shape[-2:] == (h, w):
        return out
    p = transformer.config.patch_size
    b, c = out.shape[:2]
    tokens = out[:, :, : (h // p) * (w // p)]
    grid = tokens.reshape(b, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5)
    return grid.reshape(b, c, h, w)


# The device of the running caching phase (None outside one): encode_prompts places each
# encoder there in turn.
ENCODE_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "hidream_encode_device", default=None
)


@contextlib.contextmanager
def encoding_device(device):
    token = ENCODE_DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        ENCODE_DEVICE.reset(token)


def check_router_untouched(adapter) -> None:
    """The MoE router stays frozen: a target naming it is refused (its weight is a bare
    Parameter, which PEFT cannot wrap; training it would re-route tokens)."""
    named = [t for t in adapter.targets or () if "gate" in t.split(".")]
    if named:
        raise TunerError(
            f"adapter.targets: {named[0]!r} is HiDream's MoE router, which stays frozen; "
            "target the experts (ff_i.experts.0.w1, ff_i.shared_experts.w2, ...) instead"
        )
    regex = adapter.target_regex
    routers = ("double_stream_blocks.0.block.ff_i.gate", "single_stream_blocks.0.block.ff_i.gate")
    try:
        hits = bool(regex) and any(re.fullmatch(regex, name) for name in routers)
    except re.error:
        return  # lora.denoiser_targets names the bad regex
    if hits:
        raise TunerError(
            "adapter.target_regex: it matches HiDream's MoE router (ff_i.gate), which "
            "stays frozen; exclude it, e.g. end the regex with (w1|w2|w3)"
        )


def check_patch_budget(comps: Components, data) -> None:
    """Buckets hold at most resolution^2 pixels; HiDream's transformer pads non-square images
    to max_seq patches (4096: 1024^2) and cannot take more."""
    limit = comps.denoiser.config.max_resolution[0] * mmdit.vae_scale(comps)
    sizes = [("data.resolution", data.resolution)]
    sizes += [(f"data.datasets.{i}.resolution", e.resolution) for i, e in enumerate(data.datasets)]
    buckets = data.bucket_options
    if buckets is not None and buckets.area is not None:
        sizes.append(("data.buckets.area", math.isqrt(buckets.area)))
    for key, value in sizes:
        if value and value > limit:
            raise TunerError(
                f"{key}: {value} is more than the {limit} px HiDream's transformer holds "
                f"({comps.denoiser.max_seq} patches); use {limit} or less"
            )


def detect_variant(path: str, scheduler) -> str:
    """full | dev | fast: from the model's name (HiDream-ai/HiDream-I1-Dev, a folder or file
    named so), else from its scheduler (UniPC: Full; flow Euler at shift 6: Dev, else Fast)."""
    name = Path(str(path)).name.lower()
    for variant in VARIANTS:
        if variant in name.replace("_", "-").split("-"):
            return variant
    if type(scheduler).__name__.startswith("UniPC"):
        return "full"
    return "dev" if float(scheduler.config.get("shift", 3.0)) >= 6.0 else "fast"


def load_single_file(family, model, dtype: torch.dtype):
    """A HiDream transformer checkpoint through diffusers' from_single_file; the rest of the
    pipeline from model.config (HiDreamImagePipeline has no from_single_file)."""
    path = Path(model.path).expanduser()
    if path.suffix != ".safetensors":
        raise TunerError(f"model.path: {path.name}: hidream single files are read as .safetensors")
    if not model.config:
        raise TunerError(
            f"model.path: {path.name} holds the transformer only; set model.config to a "
            "HiDream diffusers folder or hub id (e.g. HiDream-ai/HiDream-I1-Full) for the text "
            "encoders, VAE, tokenizers and scheduler"
        )
    kind = model.quantize
    if kind != "none":
        quantize.require_quantizable(kind)
        transformer = quantize.load_quantized(HiDreamImageTransformer2DModel, model, kind, dtype)
    else:
        try:
            transformer = HiDreamImageTransformer2DModel.from_single_file(
                str(path), config=model.config, subfolder="transformer", torch_dtype=dtype
            )
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise TunerError(
                f"model.path: could not load {path.name} as a HiDream transformer ({first}); "
                "set model.config to a HiDream diffusers folder or hub id"
            ) from None
    if kind != "none":  # off the GPU before quantized encoders load onto it
        quantize.park(transformer, kind)
    rest = model.model_copy(update={"path": model.config, "config": None, "quantize": "none"})
    return load_with_llama(family, rest, dtype, {"transformer": transformer})


def load_with_llama(family, model, dtype: torch.dtype, components: dict | None = None):
    """A diffusers folder or hub id, the transformer quantized if asked. HiDream's repos ship
    no Llama (it is gated): text_encoder_4 / tokenizer_4 come from the folder when it has
    them, else from meta-llama's repo, as in diffusers' docs and HiDream training script."""
    components = dict(components or {})
    kind = model.quantize
    if kind != "none" and "transformer" not in components:
        quantize.require_quantizable(kind)
        components["transformer"] = quantize.load_quantized(
            HiDreamImageTransformer2DModel, model, kind, dtype
        )
        quantize.park(components["transformer"], kind)  # before quantized encoders load
    local = Path(model.path).expanduser()
    if not (local / "text_encoder_4" / "config.json").is_file():
        components.update(llama_parts(model, dtype))
    skip = [name for name in components if name.startswith("text_encoder")]
    components.update(text_encoders.quantized_components(model, dtype, skip=skip))
    pipe = load_pipeline_modules(family, model, dtype, components)
    text_encoders.quantize_loaded(pipe, model, dtype)  # what is still in full precision
    return pipe


def llama_parts(model, dtype: torch.dtype) -> dict:
    """meta-llama's tokenizer and Llama-3.1-8B, quantized when model.text_encoder_quantize asks
    (loaded so: its bf16 weights are never all in memory)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    kind = model.text_encoder_quantize
    try:
        tokenizer = AutoTokenizer.from_pretrained(LLAMA_REPO)
        if kind == "none":
            llama = LlamaForCausalLM.from_pretrained(LLAMA_REPO, dtype=dtype)
        else:
            text_encoders.require_bitsandbytes(kind)
            llama = text_encoders.load_quantized(LlamaForCausalLM, LLAMA_REPO, kind, dtype)
        return {"tokenizer_4": tokenizer, "text_encoder_4": llama}
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise TunerError(
            f"model.path: HiDream needs Llama-3.1-8B-Instruct, which is gated: accept its "
            f"license at huggingface.co/{LLAMA_REPO} and log in (hf auth login), or put it in "
            f"the model folder as text_encoder_4/ and tokenizer_4/ ({first})"
        ) from None
