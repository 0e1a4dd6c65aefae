"""Write a diffusers ChromaTransformer2DModel as one original-layout (BFL/ComfyUI) single file,
the layout Chroma checkpoints are downloaded in (`model.diffusion_model.` prefix, fused q/k/v
and the single blocks' fused linear1). For the tests of single-file loading: the names are those
diffusers' convert_chroma_transformer_checkpoint_to_diffusers reads, written out per block here
(not derived from tuner's converter, so that a wrong name on one side fails the tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def chroma_to_bfl(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def both(bfl: str, diffusers: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = state[f"{diffusers}.{kind}"]

    both("txt_in", "context_embedder")
    both("img_in", "x_embedder")
    both("final_layer.linear", "proj_out")
    both("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj")
    both("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")
    for i in range(config["approximator_layers"]):
        layer = f"distilled_guidance_layer.layers.{i}"
        both(f"{layer}.in_layer", f"{layer}.linear_1")
        both(f"{layer}.out_layer", f"{layer}.linear_2")
        out[f"distilled_guidance_layer.norms.{i}.scale"] = state[
            f"distilled_guidance_layer.norms.{i}.weight"
        ]
    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{kind}"] = torch.cat(
                [state[f"{d}.attn.to_{x}.{kind}"] for x in "qkv"]
            )
            out[f"{b}.txt_attn.qkv.{kind}"] = torch.cat(
                [state[f"{d}.attn.add_{x}_proj.{kind}"] for x in "qkv"]
            )
        out[f"{b}.img_attn.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = state[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = state[f"{d}.attn.norm_added_k.weight"]
        both(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        both(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        both(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        both(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        both(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        both(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for kind in ("weight", "bias"):
            fused = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"]
            out[f"{b}.linear1.{kind}"] = torch.cat([state[f"{n}.{kind}"] for n in fused])
        out[f"{b}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        both(f"{b}.linear2", f"{d}.proj_out")
    return out


def save_chroma_single_file(transformer, path: Path) -> Path:
    state = chroma_to_bfl(transformer.state_dict(), transformer.config)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(path))
    return path
