"""Activation memory of one FLUX.2 block, measured at small token counts on any device.

    python -m tuner.cli.probe_flux2 --variant klein-9b --tokens 128 256

Builds one double-stream and one single-stream block at the variant's real width (bf16, random
init), puts rank-16 LoRA on the family's default targets, runs a training forward with the
default targets trainable and sums the bytes of every tensor autograd saves for backward
(parameters excluded). That is what one block holds while it is recomputed under gradient
checkpointing; the recipes' peak-memory figures scale it to 4608 tokens (1024^2 + 512 text).
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Modulation,
    Flux2SingleTransformerBlock,
    Flux2TransformerBlock,
)
from peft import LoraConfig, inject_adapter_in_model

from tuner.builtins.flux2 import flux2_transformer_config

TEXT_SHARE = 512 / 4608  # text tokens in a 1024^2 step with 512-token prompts


def saved_bytes(run) -> int:
    params = set()
    seen: dict[int, int] = {}

    def pack(tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.data_ptr() in params:
            return tensor
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def collect(module):
        params.update(p.data_ptr() for p in module.parameters())

    run(collect, pack)
    return sum(seen.values())


def block_bytes(variant: str, tokens: int, device: str) -> dict[str, int]:
    config = flux2_transformer_config(variant)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    text = max(1, int(tokens * TEXT_SHARE))
    image = tokens - text
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    single_lora = LoraConfig(r=16, lora_alpha=16, target_modules=["to_qkv_mlp_proj", "to_out"])
    out = {}
    with torch.device(device):
        rope = (torch.ones(tokens, head_dim), torch.zeros(tokens, head_dim))
        temb = torch.randn(1, dim, dtype=torch.bfloat16)
        for name, block, config_ in (
            ("double", Flux2TransformerBlock(dim, heads, head_dim), lora),
            ("single", Flux2SingleTransformerBlock(dim, heads, head_dim), single_lora),
        ):
            block = inject_adapter_in_model(config_, block.to(torch.bfloat16))
            for pname, param in block.named_parameters():
                param.requires_grad_("lora_" in pname)
            sets = 2 if name == "double" else 1
            mod = Flux2Modulation(dim, mod_param_sets=sets).to(torch.bfloat16)(temb)

            def run(collect, pack, block=block, name=name, mod=mod):
                collect(block)
                hidden = torch.randn(1, image, dim, dtype=torch.bfloat16)
                context = torch.randn(1, text, dim, dtype=torch.bfloat16)
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    if name == "double":
                        block(hidden, context, mod, mod, rope)
                    else:
                        block(torch.cat([context, hidden], dim=1), None, mod, rope)

            out[name] = saved_bytes(run)
            del block
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="klein-9b", choices=["dev", "klein-4b", "klein-9b"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for tokens in args.tokens:
        measured = block_bytes(args.variant, tokens, args.device)
        per_token = {k: round(v / tokens) for k, v in measured.items()}
        row = {"variant": args.variant, "tokens": tokens, "bytes": measured}
        print(json.dumps({**row, "bytes_per_token": per_token}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
