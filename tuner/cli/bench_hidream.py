"""Activation memory of HiDream-I1's blocks at full width, measured on the CPU at small token
counts and extrapolated to 1024^2: the activation term of the 24 GB recipes' memory estimate
(docs/BENCHMARKS.md, "HiDream-I1"), for sessions without a GPU.

    python -m tuner.cli.bench_hidream [--tokens 160 320 640]

One dual-stream and one single-stream block of the released config (2560 wide, 4 experts top
2), bf16, LoRA rank 16 on the attention, run forward in train mode (the differentiable MoE
path) with grad, as gradient checkpointing recomputes one block during backward. Every tensor
autograd saves for backward is counted once (by storage), the block's frozen weights excepted.
The text part of each block's input keeps the 1024^2 proportion (image : text = 4096 : 384
dual, 4096 : 384 + 128 single).
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers.models.transformers.transformer_hidream_image import (
    HiDreamBlock,
    HiDreamImageSingleTransformerBlock,
    HiDreamImageTransformerBlock,
)
from peft import LoraConfig, inject_adapter_in_model

from tuner.builtins.hidream import hidream_transformer_config
from tuner.builtins.parts import default_dtype

IMAGE_TOKENS_1024 = 4096
TEXT_DUAL_1024 = 384  # T5 128 + Llama 128 (carried) + this block's Llama layer 128
TEXT_SINGLE_1024 = 384 + 128


def saved_bytes(block, hidden, text, temb, rope) -> int:
    """Bytes autograd keeps for backward, the block's own (frozen) weights left out: with an
    NF4 base those are the quantized weights, counted separately."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(hidden, None, text, temb, rope)
    del out
    return sum(storages.values())


def measure(kind: str, image_tokens: int) -> int:
    config = hidream_transformer_config()
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    inner = HiDreamImageTransformerBlock if kind == "dual" else HiDreamImageSingleTransformerBlock
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        block = HiDreamBlock(
            inner(
                dim=dim,
                num_attention_heads=config["num_attention_heads"],
                attention_head_dim=config["attention_head_dim"],
                num_routed_experts=config["num_routed_experts"],
                num_activated_experts=config["num_activated_experts"],
            )
        )
    block.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out"]
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets), block)
    for name, param in block.named_parameters():
        param.requires_grad_("lora_" in name)
    block.train()
    scale = image_tokens / IMAGE_TOKENS_1024
    text_tokens = round((TEXT_DUAL_1024 if kind == "dual" else TEXT_SINGLE_1024) * scale)
    head = config["attention_head_dim"]
    total = image_tokens + text_tokens
    hidden_len = image_tokens if kind == "dual" else total
    hidden = torch.randn(1, hidden_len, dim, dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(1, text_tokens, dim, dtype=torch.bfloat16) if kind == "dual" else None
    temb = torch.randn(1, dim, dtype=torch.bfloat16)
    rope = torch.randn(1, total, 1, head // 4, 2, 2)  # the (cos, -sin, sin, cos) table's shape
    return saved_bytes(block, hidden, text, temb, rope)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[160, 320, 640])
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = {}
    for kind in ("dual", "single"):
        sizes = [(n, measure(kind, n)) for n in args.tokens]
        (n0, b0), (n1, b1) = sizes[0], sizes[-1]
        per_token = (b1 - b0) / (n1 - n0)
        at_1024 = b1 + per_token * (IMAGE_TOKENS_1024 - n1)
        report[kind] = {
            "measured_bytes": dict(sizes),
            "bytes_per_image_token": per_token,
            "extrapolated_1024_GiB": at_1024 / 2**30,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
