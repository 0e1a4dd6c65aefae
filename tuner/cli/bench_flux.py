"""Flux.1 LoRA training step on the real architecture: peak GPU memory and seconds per step.

    python -m tuner.cli.bench_flux                      # dev, NF4, 1024^2, rank 16, 8-bit AdamW
    python -m tuner.cli.bench_flux --quantize none      # the bf16 baseline
    python -m tuner.cli.bench_flux --quantize fp8 --offload-blocks 8   # the memory kit

Only the transformer is built (random init from the FLUX.1 config, no download); the text
embeddings are random tensors of the cached shapes (T5 512 x 4096, CLIP pooled 768) and the
latents random 16-channel 1024/8 maps, as a run with cached latents and embeddings feeds it.
Each step is the training loop's: flow-matching objective, family.predict under bf16 autocast,
weighted MSE, backward, gradient clipping, optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.cli.bench_flux", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--variant", choices=("dev", "schnell"), default="dev")
    parser.add_argument("--quantize", choices=("nf4", "int8", "fp8", "none"), default="nf4")
    parser.add_argument(
        "--offload-blocks", type=int, default=0, help="train.offload_blocks: blocks swapped"
    )
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--seq", type=int, default=512, help="T5 sequence length")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument(
        "--no-cudnn-attention",
        action="store_true",
        help="turn off the cuDNN SDPA backend (flash/efficient kernels instead)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="builtin:tiny-flux's transformer instead (runs on CPU too)",
    )
    return parser.parse_args(argv)


def build_transformer(variant: str, quantize: str, tiny: bool = False):
    """Random-init FLUX.1 transformer in bf16 on the GPU, quantized like model.quantize does."""
    from diffusers import FluxTransformer2DModel

    from tuner.builtins.flux import build_tiny_flux, flux_transformer_config
    from tuner.builtins.parts import default_dtype
    from tuner.families.fp8 import store_in_fp8
    from tuner.families.quantize import load_quantized_folder

    if tiny:  # a smoke test of this script on any machine
        model = build_tiny_flux()["transformer"].to(torch.bfloat16)
    else:
        torch.manual_seed(0)
        with default_dtype(torch.bfloat16), torch.device("cuda"):
            model = FluxTransformer2DModel(**flux_transformer_config(variant))
    if quantize == "fp8":  # model.quantize=fp8's own route (families/fp8.py)
        store_in_fp8(model, torch.bfloat16)
    if quantize in ("none", "fp8"):
        return model
    # The same route as a builtin with model.quantize: save, then load through diffusers'
    # BitsAndBytesConfig. /dev/shm, when it has room, keeps the 24 GB round trip off the disk.
    room = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    workdir = "/dev/shm" if room > 30 * 2**30 else None
    with tempfile.TemporaryDirectory(prefix="bench-flux-", dir=workdir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
        return load_quantized_folder(FluxTransformer2DModel, tmp, quantize, torch.bfloat16)


def main(argv=None) -> dict:
    from tuner.adapters import lora
    from tuner.builtins.flux import flux_scheduler
    from tuner.families.flux import FluxFamily
    from tuner.objectives.common import weighted_mse
    from tuner.objectives.flow import FlowMatchObjective
    from tuner.recipe import AdapterSection, TrainSection
    from tuner.training import block_swap
    from tuner.training.optim import build_optimizer

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and args.quantize in ("none", "fp8")):
        raise SystemExit("bench_flux needs a CUDA GPU (or --tiny --quantize none|fp8)")
    device = torch.device("cuda" if cuda else "cpu")
    if args.no_cudnn_attention:
        # Some torch/cuDNN pairs fail in cuDNN attention's backward at Flux's 4608 tokens.
        torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.perf_counter()
    transformer = build_transformer(args.variant, args.quantize, args.tiny)
    build_s = time.perf_counter() - started

    family = FluxFamily()
    comps = SimpleNamespace(
        denoiser=transformer, text_encoders={}, dtype=torch.bfloat16, guidance=1.0
    )
    trained = lora.inject(comps, AdapterSection(rank=args.rank, alpha=args.rank), family)
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    # As the run does: after LoRA, before the move (the swapped weights go to pinned host memory).
    swap = block_swap.install(family, transformer, args.offload_blocks, device)
    transformer.to(device).train()
    train = TrainSection(steps=args.steps, optimizer=args.optimizer, lr=1e-4)
    params = lora.trainable_parameters(trained["transformer"])
    optimizer = build_optimizer([{"params": params, "lr": train.lr}], train, device)
    objective = FlowMatchObjective(
        flux_scheduler(args.variant), shift=3.0, resolution_shift=args.variant == "dev"
    )

    side = args.resolution // 8
    config = transformer.config
    latents = torch.randn(args.batch, config.in_channels // 4, side, side, device=device)
    cond = {
        "prompt_embeds": torch.randn(
            args.batch, args.seq, config.joint_attention_dim, device=device, dtype=torch.bfloat16
        ),
        "pooled_prompt_embeds": torch.randn(
            args.batch, config.pooled_projection_dim, device=device, dtype=torch.bfloat16
        ),
    }
    generator = torch.Generator(device).manual_seed(0)
    static_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0

    def step() -> torch.Tensor:
        inputs = objective.sample(latents, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = family.predict(comps, inputs.noisy, inputs.timesteps, cond, {})
        loss = weighted_mse(pred, inputs.target, inputs.weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - timed) / args.steps
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "variant": "tiny" if args.tiny else args.variant,
        "quantize": args.quantize,
        "offload_blocks": args.offload_blocks,
        "block_copies_per_step": round(swap.copies / (args.warmup + args.steps), 1) if swap else 0,
        "resolution": args.resolution,
        "batch": args.batch,
        "rank": args.rank,
        "optimizer": args.optimizer,
        "gradient_checkpointing": not args.no_checkpointing,
        "t5_tokens": args.seq,
        "cudnn_attention": not args.no_cudnn_attention,
        "lora_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
        "weights_gib": round(static_gib, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0,
        "s_per_step": round(seconds, 3),
        "images_per_s": round(args.batch / seconds, 3),
        "final_loss": round(float(loss), 4),
        "build_s": round(build_s, 1),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
