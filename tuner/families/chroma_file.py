"""Chroma single files (the original BFL/ComfyUI layout: `double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `distilled_guidance_layer.*`, optionally under
`model.diffusion_model.`) -> diffusers' ChromaTransformer2DModel names.

diffusers 0.42's own converter (single_file_utils.convert_chroma_transformer_checkpoint_to_
diffusers) splits the single blocks' fused linear1 at the full model's fixed widths (3072 and
12288), so it can read only a full-size Chroma; here the widths come from the model's config and
the tensors, and the converted state goes to from_single_file already in diffusers names (which
then loads it as is, quantized when model.quantize asks). The key names are those that converter
reads; tests/families/test_chroma.py checks that both give the same state at full width.
"""

from __future__ import annotations

import torch

PREFIX = "model.diffusion_model."

# BFL name -> diffusers name, for keys renamed as they are (.weight / .bias / .scale follow).
TOP_LEVEL = {
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
GUIDANCE_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
DOUBLE_BLOCK = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_BLOCK = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1, in this order


def is_bfl_layout(state: dict) -> bool:
    return any(key.removeprefix(PREFIX).startswith("double_blocks.") for key in state)


def to_diffusers(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A BFL-layout Chroma transformer state -> diffusers names; `config`: the transformer's."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = key.removeprefix(PREFIX)
        for new_key, value in convert_key(key, tensor, inner):
            out[new_key] = value
    return out


def convert_key(key: str, tensor: torch.Tensor, inner: int):
    """(diffusers name, tensor) pairs for one BFL tensor (several for a fused projection)."""
    stem, _, kind = key.rpartition(".")  # kind: weight | bias | scale
    parts = key.split(".")
    if parts[0] == "double_blocks":
        block, rest = f"transformer_blocks.{parts[1]}.", ".".join(parts[2:])
        rest_stem = rest.rpartition(".")[0]
        if rest in DOUBLE_BLOCK:
            return [(block + DOUBLE_BLOCK[rest], tensor)]
        if rest_stem in DOUBLE_QKV:
            names = DOUBLE_QKV[rest_stem]
            return [(f"{block}{n}.{kind}", t) for n, t in zip(names, tensor.chunk(3, dim=0))]
        return [(f"{block}{DOUBLE_BLOCK[rest_stem]}.{kind}", tensor)]
    if parts[0] == "single_blocks":
        block, rest = f"single_transformer_blocks.{parts[1]}.", ".".join(parts[2:])
        rest_stem = rest.rpartition(".")[0]
        if rest in SINGLE_BLOCK:
            return [(block + SINGLE_BLOCK[rest], tensor)]
        if rest_stem == "linear1":
            sizes = (inner, inner, inner, tensor.shape[0] - 3 * inner)
            pieces = torch.split(tensor, sizes, dim=0)
            return [(f"{block}{n}.{kind}", t) for n, t in zip(SINGLE_FUSED, pieces)]
        return [(f"{block}{SINGLE_BLOCK[rest_stem]}.{kind}", tensor)]
    if key.startswith("distilled_guidance_layer.layers."):
        index, layer = parts[2], parts[3]
        name = f"distilled_guidance_layer.layers.{index}.{GUIDANCE_LAYER[layer]}.{kind}"
        return [(name, tensor)]
    if key.startswith("distilled_guidance_layer.norms."):
        return [(f"distilled_guidance_layer.norms.{parts[2]}.weight", tensor)]
    if stem in TOP_LEVEL:
        return [(f"{TOP_LEVEL[stem]}.{kind}", tensor)]
    return [(key, tensor)]  # unknown keys pass through; the strict load names them


DEFAULT_CONFIG = "lodestones/Chroma1-HD"  # where a file's configs and other components come from


def load_pipeline(family, model, dtype: torch.dtype):
    """A Chroma single file: the transformer converted here (any width) and loaded through
    from_single_file (quantized if asked); T5, its tokenizer, the VAE and the scheduler from
    model.config (a diffusers folder or hub id; default: Chroma1-HD's)."""
    from pathlib import Path

    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import load_file

    from tuner.errors import TunerError
    from tuner.families import quantize, text_encoders
    from tuner.families.loading import load_pipeline_modules, source_kind

    path = Path(model.path).expanduser()
    if path.suffix != ".safetensors":
        raise TunerError(f"model.path: {path.name}: chroma single files are read as .safetensors")
    config = model.config or DEFAULT_CONFIG
    if source_kind(config) == "folder":
        config = str(Path(config).expanduser())
    kwargs = {"config": config, "subfolder": "transformer", "torch_dtype": dtype}
    if model.quantize != "none":
        quantize.require_quantizable(model.quantize)
        kwargs["quantization_config"] = quantize.bnb_config(model.quantize, dtype)
    try:
        transformer_config = ChromaTransformer2DModel.load_config(config, subfolder="transformer")
        state = load_file(str(path))
        if is_bfl_layout(state):
            state = to_diffusers(state, transformer_config)
        transformer = ChromaTransformer2DModel.from_single_file(state, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(
            f"model.path: could not load {path.name} as a Chroma transformer ({first}); set "
            "model.config to a Chroma diffusers folder or hub id of the same size"
        ) from None
    rest = model.model_copy(update={"path": config, "config": None})
    encoders = text_encoders.quantized_components(rest, dtype)
    pipe = load_pipeline_modules(family, rest, dtype, {"transformer": transformer, **encoders})
    text_encoders.quantize_loaded(pipe, model, dtype)
    if model.quantize != "none":
        quantize.park(pipe.transformer, model.quantize)
    return pipe
