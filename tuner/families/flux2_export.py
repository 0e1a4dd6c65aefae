"""The ComfyUI file for Flux.2: kohya-style names over Black Forest Labs' original module names.

ComfyUI runs FLUX.2 on its own Flux model class, whose weights carry BFL's checkpoint names
(`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...). Its LoRA loader
(comfy/lora.py `model_lora_keys_unet`, read for this) maps `lora_unet_<name with dots as
underscores>` onto every `diffusion_model.<name>.weight` of any model, and `load_lora` reads
`lora_down` / `lora_up` / `alpha` there. diffusers' Flux.2 loader reads the same layout
(`_convert_kohya_flux2_lora_to_diffusers`), splitting a fused qkv LoRA whose up weight is block
diagonal back into its three projections exactly.

diffusers' to_q / to_k / to_v are slices of BFL's fused qkv: their LoRAs become one LoRA of rank
3r on the fused layer, down weights stacked and up weights block diagonal, so its product is the
three products stacked. The PEFT scale alpha / rank is folded into the up weights and `alpha`
is written as the rank (scale 1), which every reader of the file then applies alike.
"""

from __future__ import annotations

import re

import torch

from tuner.adapters import formats
from tuner.errors import TunerError

PREFIX = "lora_unet_"
FUSED = {  # BFL fused layer -> its diffusers slices, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
DOUBLE = {  # diffusers module in transformer_blocks.N -> BFL module in double_blocks.N
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "proj_out": "final_layer.linear",
}
# Modules diffusers' kohya Flux.2 reader does not map (it would drop them): refused.
UNMAPPED = ("modulation", "norm_out", "guidance_embedder")


def bfl_name(module: str) -> tuple[str, int | None]:
    """diffusers module -> (BFL module, slice index in a fused qkv or None)."""
    match = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", module)
    if match:
        block, rest = match.groups()
        for fused, parts in FUSED.items():
            if rest in parts:
                return f"double_blocks.{block}.{fused}", parts.index(rest)
        if rest in DOUBLE:
            return f"double_blocks.{block}.{DOUBLE[rest]}", None
    match = re.match(r"^single_transformer_blocks\.(\d+)\.(.+)$", module)
    if match and match.group(2) in SINGLE:
        return f"single_blocks.{match.group(1)}.{SINGLE[match.group(2)]}", None
    if module in GLOBAL:
        return GLOBAL[module], None
    raise TunerError(
        f"cannot name {module!r} in ComfyUI's FLUX.2 layout (diffusers reads no such kohya "
        "key); target attention, feed-forward or single-block layers, or write the diffusers "
        "format only (output.formats=[diffusers])"
    )


def comfy_lora(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """A diffusers-format Flux.2 LoRA -> the kohya/BFL layout ComfyUI maps for FLUX.2."""
    configs = formats.lora_configs(metadata)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = formats.DIFFUSERS_LORA.match(key)
        if match is None or match["component"] != "transformer":
            raise TunerError(
                f"cannot convert key {key!r} to ComfyUI's FLUX.2 layout (only transformer "
                "LoRA has one); export the diffusers format instead"
            )
        kind = "down" if match["kind"] in formats.DOWN_KINDS else "up"
        modules.setdefault(match["module"], {})[kind] = tensor
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, pair in modules.items():
        rank = pair["down"].shape[0]
        scale = formats.kohya_alpha(configs.get("transformer", {}), module, rank) / rank
        down, up = pair["down"], pair["up"] * scale
        name, part = bfl_name(module)
        if part is None:
            put(out, name, down, up)
        else:
            fused.setdefault(name, {})[part] = (down, up)
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise TunerError(
                f"{name}: ComfyUI's FLUX.2 layout fuses q, k and v into one layer; target all "
                "three (to_q, to_k, to_v / add_q_proj, add_k_proj, add_v_proj) or none"
            )
        downs = [parts[i][0] for i in range(3)]
        ups = [parts[i][1] for i in range(3)]
        put(out, name, torch.cat(downs), torch.block_diag(*ups))
    return out


def put(out: dict, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    stem = PREFIX + name.replace(".", "_")
    out[f"{stem}.lora_down.weight"] = down.contiguous()
    out[f"{stem}.lora_up.weight"] = up.contiguous()
    out[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]))


def refuse_unmappable_targets(adapter) -> None:
    """Targets the ComfyUI file cannot hold are refused before training, not at the end."""
    named = list(adapter.targets or []) + ([adapter.target_regex] if adapter.target_regex else [])
    for target in named:
        if any(word in target for word in UNMAPPED):
            raise TunerError(
                f"adapter.targets: {target!r}: FLUX.2's modulation, norm_out and guidance "
                "layers have no name diffusers reads back from the ComfyUI file; leave them out"
            )
    chosen = set(adapter.targets or [])
    for parts in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
        if chosen & set(parts) and not set(parts) <= chosen:
            raise TunerError(
                f"adapter.targets: target all of {', '.join(parts)} or none (they are one "
                "fused layer in the ComfyUI file)"
            )
