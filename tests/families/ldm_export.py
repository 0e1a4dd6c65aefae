"""Write an SD1.x pipeline as one original-layout (LDM) `.safetensors` checkpoint.

A1111, Forge and ComfyUI load checkpoints in the original CompVis layout, and diffusers reads it
back with `from_single_file`. diffusers only converts in the other direction, so this module maps
diffusers names back to LDM names. It is used by `tuner merge --single-file` and by the tests
that check single-file loading.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per_level = layers_per_block + 1
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "conv_in":
            new = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "conv_norm_out":
            new = f"out.0.{parts[1]}"
        elif parts[0] == "conv_out":
            new = f"out.2.{parts[1]}"
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(level + 1) * per_level}.0.op.{'.'.join(parts[5:])}"
            else:
                block = 1 + level * per_level + int(parts[3])
                new = _block(block, kind, parts[4:], "input_blocks")
        elif parts[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
            sub = _resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
            new = f"middle_block.{index}.{sub}"
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                block = level * per_level + layers_per_block
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
                new = f"output_blocks.{block}.{2 if has_attention else 1}.{'.'.join(parts[4:])}"
            else:
                new = _block(level * per_level + int(parts[3]), kind, parts[4:], "output_blocks")
        else:
            raise ValueError(f"unexpected UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def _block(block: int, kind: str, rest: list[str], name: str) -> str:
    if kind == "resnets":
        return f"{name}.{block}.0.{_resnet(rest)}"
    return f"{name}.{block}.1.{'.'.join(rest)}"


def _resnet(rest: list[str]) -> str:
    return f"{RESNET[rest[0]]}.{'.'.join(rest[1:])}"


def vae_to_ldm(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if side == "encoder" else num_levels - 1 - int(parts[2])
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                tail = ".".join(parts[5:])
                sub = "nin_shortcut" if parts[5] == "conv_shortcut" else None
                new = f"{side}.{group}.{level}.block.{parts[4]}." + (
                    f"{sub}.{'.'.join(parts[6:])}" if sub else tail
                )
            else:
                sampler = "downsample" if side == "encoder" else "upsample"
                new = f"{side}.{group}.{level}.{sampler}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                name = f"block_{int(parts[3]) + 1}"
                tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.mid.{name}.{tail}"
            else:
                attr = ".".join(parts[4:-1])
                new = f"{side}.mid.attn_1.{VAE_ATTENTION[attr]}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        else:
            tail = ".".join(parts[1:]).replace("conv_norm_out", "norm_out")
            new = f"{side}.{tail}"
        out[f"first_stage_model.{new}"] = value
    return out


def save_sd15_single_file(pipe, path: Path) -> Path:
    """The pipeline's UNet, VAE and CLIP text encoder as one LDM-layout safetensors file."""
    unet_layers = pipe.unet.config.layers_per_block
    state = unet_to_ldm(pipe.unet.state_dict(), unet_layers)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 drops the `text_model.` level from CLIP's names; checkpoints keep it.
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{key}"] = value
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
