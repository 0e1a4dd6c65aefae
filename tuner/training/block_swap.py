"""Block swap (`train.offload_blocks: N`): the Linear weights of the denoiser's first N blocks
live in host memory (pinned on CUDA) and are copied to the compute device when a block runs,
the next block's copy started ahead on a side stream; in backward the copies are made again
(in reverse order, prefetching the block before), so gradient checkpointing's recomputation
finds them as well.

How: each swapped Linear's forward becomes one autograd Function that saves the *host* weight
and asks the swapper for the device copy in forward and again in backward, so no device copy is
held by autograd between uses. The swapper keeps at most two blocks' copies (the running one and
the prefetched one). Only frozen base weights move: LoRA layers, biases, norms and scales stay
on the device (a block's Linear weights are nearly all of its bytes).

On a CPU run the same logic runs with a copy to the same device (`clone`), which is what the
CPU tests exercise; `copy` can be any function host tensor -> device tensor.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tuner.errors import TunerError
from tuner.families.fp8 import Fp8Linear, upcast

# The device-resident part of an offloaded block (`tuner plan`): two blocks' Linear weights
# (running + prefetched); the offloaded blocks' other Linear weights sit in host memory.
RESIDENT_BLOCKS = 2


class _Streamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, materialize):
        ctx.materialize, ctx.input_dtype = materialize, x.dtype
        weight = materialize()
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.materialize()
        return (grad_out.to(weight.dtype) @ weight).to(ctx.input_dtype), None, None


def base_linears(block: nn.Module) -> list[nn.Linear]:
    """The frozen base Linear layers of a block (PEFT's LoRA A/B layers excluded)."""
    return [
        m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear)
        and "lora_" not in name
        and not m.weight.requires_grad
        and "weight" in m._parameters
    ]


class BlockSwap:
    """Owns the host copies of N blocks' Linear weights and their device copies in use."""

    def __init__(self, blocks: list[nn.Module], n: int, device, copy=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copy = copy or (lambda t: t.to(self.device, non_blocking=True))
        self.layers = [base_linears(block) for block in blocks[:n]]
        self.resident: dict[int, tuple[list[torch.Tensor], object]] = {}  # block -> copies, event
        self.copies = 0  # blocks copied to the device (tests, benchmarks)
        for index, layers in enumerate(self.layers):
            for layer in layers:
                # A plain attribute, not a Parameter: the module's .to(device) leaves it home.
                weight = layer._parameters.pop("weight").detach().to("cpu")
                layer.weight = weight.pin_memory() if self.cuda else weight
            for slot, layer in enumerate(layers):
                layer.forward = functools.partial(streamed_forward, layer, self, index, slot)

    def weight(self, index: int, slot: int) -> torch.Tensor:
        # In backward (the Function's backward, or a checkpoint's recomputation) blocks run in
        # reverse order, so the one to prefetch is the block before.
        copies, event = self.ensure(index, backward=in_backward())
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return copies[slot]

    def ensure(self, index: int, backward: bool):
        """Block `index` on the device, the block that runs next prefetched, the rest freed."""
        following = index - 1 if backward else index + 1
        keep = {index, following}
        for stale in [i for i in self.resident if i not in keep]:
            del self.resident[stale]  # the caching allocator reuses it for the next copy
        if index not in self.resident:
            self.resident[index] = self._fetch(index)
        if 0 <= following < len(self.layers) and following not in self.resident:
            self.resident[following] = self._fetch(following)
        return self.resident[index]

    def _fetch(self, index: int):
        self.copies += 1
        if not self.cuda:
            return [self.copy(layer.weight) for layer in self.layers[index]], None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copies = [self.copy(layer.weight) for layer in self.layers[index]]
            event = torch.cuda.Event()
            event.record(self.stream)
        for tensor in copies:  # freed by the compute stream only after its use there
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return copies, event


def streamed_forward(layer: nn.Linear, swap: BlockSwap, index: int, slot: int, x):
    def materialize() -> torch.Tensor:
        weight = swap.weight(index, slot)
        if isinstance(layer, Fp8Linear):
            return upcast(weight, layer.weight_scale, layer.compute_dtype)
        return weight

    return _Streamed.apply(x, layer.bias, materialize)


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def install(family, denoiser: nn.Module, n: int, device, copy=None) -> BlockSwap | None:
    """Swap the first n of the family's blocks (after LoRA injection, before the denoiser
    moves to the device: the swapped weights then never visit it whole); None when n is 0."""
    if n == 0:
        return None
    blocks = family.blocks(denoiser)
    if not blocks:
        raise TunerError(
            f"train.offload_blocks: {family.spec.name} has no transformer blocks to swap; "
            "set train.offload_blocks=0"
        )
    if n > len(blocks):
        raise TunerError(
            f"train.offload_blocks: {n} is more than this model's {len(blocks)} blocks; "
            f"use at most {len(blocks)}"
        )
    return BlockSwap(blocks, n, device, copy)
