"""FSDP2 sharding of the frozen base (`./launch.sh --config-file recipes/accelerate/fsdp2.yaml`).

accelerate's launcher turns the config into ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 in
every worker. We shard with torch's `fully_shard` ourselves (each of the family's blocks, then
the root) instead of `accelerator.prepare(model)`: the denoiser keeps its type, config and PEFT
adapters, and the same code runs on CPU (gloo), where accelerate ignores FSDP. FSDP then
reduce-scatters the LoRA gradients in backward (our own all-reduce is skipped) and every
parameter, LoRA included, is a DTensor shard: saving gathers the full LoRA tensors and the
optimizer state on every process; resuming cuts them back into this process's shards.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def requested(accelerator) -> bool:
    return (
        accelerator.num_processes > 1
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and os.environ.get("FSDP_VERSION") == "2"
    )


def shard(family, denoiser: nn.Module, dtype: torch.dtype) -> None:
    """Shard the denoiser (after LoRA injection and the move to the device), in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 needs one dtype per shard group: with a bf16 base the fp32 LoRA weights are
    # gathered in bf16 for compute, their shards (what the optimizer updates) stay fp32, and
    # gradients are reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    for block in family.blocks(denoiser):
        fully_shard(block, mp_policy=policy)
    fully_shard(denoiser, mp_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full(value):
    """A DTensor gathered into a plain tensor (a collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, list):
        return [full(v) for v in value]
    return value


def cut_like(value, like):
    """A full tensor cut into the shard `like` (a DTensor parameter) holds on this process."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)


GATHERED = "_tuner_gathered_lora"  # module attribute lora.peft_state returns while saving


class gathered:
    """While saving: every process gathers the sharded LoRA weights and optimizer state (the
    collectives all processes must join), so that the main process writes full tensors.
    A no-op for an unsharded run."""

    def __init__(self, run):
        self.modules = [m for m in run.trained.values() if is_sharded(m)]
        self.optimizer = run.optimizer

    def __enter__(self):
        if not self.modules:
            return self
        from peft.utils import get_peft_model_state_dict

        for module in self.modules:
            setattr(module, GATHERED, full(get_peft_model_state_dict(module)))
        state = full(self.optimizer.state_dict())
        self.optimizer.state_dict = lambda: state  # an instance attribute, removed on exit
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            delattr(module, GATHERED)
        self.optimizer.__dict__.pop("state_dict", None)
        return False


def cut_lora_state(module: nn.Module, weights: dict) -> dict:
    """Full LoRA tensors from a checkpoint (PEFT names), cut into this process's shards."""
    if not is_sharded(module):
        return weights
    params = dict(module.named_parameters())

    def model_key(key: str) -> str:
        for part in (".lora_A.", ".lora_B."):
            key = key.replace(part, f"{part}default.")
        return key

    return {k: cut_like(v, params.get(model_key(k))) for k, v in weights.items()}


def cut_optimizer_state(optimizer) -> None:
    """After load_state_dict of a gathered state: each state tensor cut like its parameter."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = cut_like(value, param)


def unsharded(params: list) -> list:
    """The parameters FSDP does not reduce (all of them in a run without FSDP)."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


def clip_grad_norm(accelerator, params: list, max_norm: float):
    """accelerator.clip_grad_norm_, or for DTensor parameters torch's own (the norm over all
    shards), returned as a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        return accelerator.clip_grad_norm_(params, max_norm)
    accelerator.unscale_gradients()
    return full(torch.nn.utils.clip_grad_norm_(params, max_norm))


def check(recipe) -> None:
    """What an FSDP run cannot do, refused before training (one line each)."""
    from tuner.errors import TunerError

    if recipe.sample.prompts:
        raise TunerError(
            "sample.prompts: sampling is not supported in an FSDP run (the main process alone "
            "cannot run a sharded model); remove them and run `tuner sample` on the adapter"
        )
    if recipe.adapter.text_encoder:
        raise TunerError(
            "adapter.text_encoder: text-encoder LoRA is not supported with FSDP (only the "
            "denoiser is sharded); set it to false or train without the FSDP config"
        )
    if recipe.train.offload_blocks:
        raise TunerError(
            "train.offload_blocks: block swap does not combine with FSDP sharding; "
            "set train.offload_blocks=0"
        )
