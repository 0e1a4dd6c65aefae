"""GPU speed switches (train.compile, train.channels_last, train.sdpa_backend, train.fused_adamw):
checked before anything loads, applied once the adapters are in place."""

from __future__ import annotations

import logging

import torch

from tuner.errors import TunerError

log = logging.getLogger("tuner")

# Repeated blocks of denoisers whose diffusers class names none (SD3 has no _repeated_blocks).
EXTRA_REPEATED_BLOCKS = ("JointTransformerBlock",)
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


def check_speed_switches(train, device_type: str) -> None:
    """Device-level refusals (the family-level ones are in tuner.families.checks)."""
    if train.sdpa_backend != "auto" and device_type != "cuda":
        raise TunerError(
            f"train.sdpa_backend: {train.sdpa_backend} picks a CUDA attention kernel and this run "
            "is on the CPU; set train.sdpa_backend=auto"
        )
    if train.sdpa_backend == "flash" and train.mixed_precision == "no":
        raise TunerError(
            "train.sdpa_backend: flash attention runs in bf16/fp16 only; set "
            "train.mixed_precision=bf16, or train.sdpa_backend=auto"
        )
    if train.fused_adamw and train.optimizer != "adamw":
        raise TunerError(
            f"train.fused_adamw: applies to train.optimizer=adamw, not {train.optimizer}; "
            "remove train.fused_adamw"
        )
    if train.fused_adamw and device_type not in ("cuda", "cpu"):
        raise TunerError(
            f"train.fused_adamw: torch has no fused AdamW on {device_type}; "
            "set train.fused_adamw=false"
        )


def set_sdpa_backend(name: str, device: torch.device) -> None:
    """auto: torch's choice without cuDNN attention, whose backward failed at Flux-size
    attention on an H100 (flash / memory-efficient kernels instead). Otherwise only that one."""
    if device.type != "cuda":
        return
    cuda = torch.backends.cuda
    if name == "auto":
        cuda.enable_cudnn_sdp(False)
        return
    cuda.enable_flash_sdp(name == "flash")
    cuda.enable_mem_efficient_sdp(name == "efficient")
    cuda.enable_math_sdp(name == "math")
    cuda.enable_cudnn_sdp(name == "cudnn")


def repeated_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(denoiser, "_repeated_blocks", None) or ()) | set(EXTRA_REPEATED_BLOCKS)
    return [m for m in denoiser.modules() if type(m).__name__ in names]


def compile_blocks(denoiser: torch.nn.Module) -> int:
    """Regional compilation: each repeated block (UNet transformer blocks, DiT blocks) is
    compiled on its own, so compiling costs seconds (one block's graph, reused by its
    siblings) instead of the whole network's. dynamic=None is torch's automatic dynamic shapes:
    the first bucket compiles static, a second size recompiles once with symbolic sizes, and
    further buckets reuse that graph instead of compiling each size."""
    blocks = repeated_blocks(denoiser)
    if not blocks:
        raise TunerError(
            f"train.compile: {type(denoiser).__name__} has no repeated blocks to compile; "
            "set train.compile=false"
        )
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)


def apply_speed_switches(recipe, comps, device: torch.device) -> None:
    train = recipe.train
    set_sdpa_backend(train.sdpa_backend, device)
    if train.channels_last:
        # UNet convolutions run NHWC kernels (tensor cores without layout transposes).
        comps.denoiser.to(memory_format=torch.channels_last)
    if train.compile:
        count = compile_blocks(comps.denoiser)
        log.info("train.compile: %d repeated blocks compiled", count)
