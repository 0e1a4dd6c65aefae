"""Z-Image LoRA training step on the real architecture (`arch-z-image`'s transformer, random
init): peak memory and seconds per step, on a CPU or a GPU.

    python -m tuner.cli.bench_z_image --resolution 256        # CPU: bf16 fits in RAM (~13 GB)
    python -m tuner.cli.bench_z_image --resolution 1024       # GPU: the 24 GB recipe's step
    python -m tuner.cli.bench_z_image --resolution 1024 --quantize fp8 --offload-blocks 8

Only the transformer is built (6.15B parameters from the Z-Image-Turbo config, in bf16); the
caption embeddings are random tensors of the cached shape (Qwen3-4B width 2560, `--caption`
tokens) and the latents random 16-channel maps at resolution / 8, as a run with cached latents
and embeddings feeds it. Each step is the training loop's: flow-matching noise at a shifted
sigma, family.predict, MSE on the velocity, backward, gradient clipping, optimizer step.
Peak memory: torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from types import SimpleNamespace

import torch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.cli.bench_z_image", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--caption", type=int, default=128, help="caption tokens per prompt")
    parser.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--quantize", choices=("none", "fp8"), default="none")
    parser.add_argument(
        "--offload-blocks", type=int, default=0, help="train.offload_blocks: blocks swapped"
    )
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny-z-image's transformer")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the result to this file")
    return parser.parse_args(argv)


def build(args, device: torch.device):
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig

    from tuner.builtins.parts import default_dtype
    from tuner.builtins.z_image import build_tiny_z_image, z_image_transformer_config
    from tuner.families import get
    from tuner.families.fp8 import store_in_fp8
    from tuner.training import block_swap

    family = get("z-image")
    torch.manual_seed(0)
    if args.tiny:  # a smoke test of this script on any machine
        transformer = build_tiny_z_image()["transformer"].to(torch.bfloat16)
    else:
        with default_dtype(torch.bfloat16):  # built in bf16: an fp32 build would need 25 GB
            transformer = ZImageTransformer2DModel(**z_image_transformer_config())
    if args.quantize == "fp8":  # model.quantize=fp8's own route (families/fp8.py)
        store_in_fp8(transformer, torch.bfloat16)
    transformer.requires_grad_(False)
    if not args.no_checkpointing:
        transformer.enable_gradient_checkpointing()
    targets = list(family.spec.default_targets)
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets))
    lora = [p for p in transformer.parameters() if p.requires_grad]
    for param in lora:
        param.data = param.data.float()  # LoRA in fp32 over the bf16 base, as training keeps it
    # As the run does: after LoRA, before the move (the swapped weights stay in host memory).
    swap = block_swap.install(family, transformer, args.offload_blocks, device)
    transformer.to(device).train()
    comps = SimpleNamespace(dtype=torch.bfloat16, denoiser=transformer)
    return family, comps, lora, swap


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward crashed at this size (H100)
    built = time.perf_counter()
    family, comps, lora, swap = build(args, device)
    built = time.perf_counter() - built
    optimizer = make_optimizer(args.optimizer, lora)
    side = args.resolution // 8
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(args.batch, 16, side, side, device=device, generator=generator)
    cond = {
        "prompt_embeds": torch.randn(
            args.batch, args.caption, comps.denoiser.config.cap_feat_dim, device=device
        ),
        "prompt_mask": torch.ones(args.batch, args.caption, dtype=torch.bool, device=device),
    }

    def step() -> None:
        sigma = torch.rand(args.batch, device=device, generator=generator)
        sigma = 3.0 * sigma / (1 + 2.0 * sigma)  # the scheduler's shift of 3
        noise = torch.randn(latents.shape, device=device, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = family.predict(comps, noisy, sigma * 1000, cond, {})
        loss = (pred.float() - (noise - latents)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    times.sort()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "batch": args.batch,
        "caption_tokens": args.caption,
        "rank": args.rank,
        "optimizer": args.optimizer,
        "gradient_checkpointing": not args.no_checkpointing,
        "quantize": args.quantize,
        "offload_blocks": args.offload_blocks,
        "block_copies_per_step": round(swap.copies / (args.warmup + args.steps), 1) if swap else 0,
        "transformer_params_b": round(sum(p.numel() for p in comps.denoiser.parameters()) / 1e9, 3),
        "lora_params_m": round(sum(p.numel() for p in lora) / 1e6, 2),
        "build_s": round(built, 1),
        "s_per_step_median": round(times[len(times) // 2], 2),
        "peak_gib": round(peak_bytes(device) / 2**30, 2),
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from pathlib import Path

        from tuner import files

        files.write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
