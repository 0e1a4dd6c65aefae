"""Bytes of stored parameters, LoRA, gradients and optimizer state, from shapes alone.

One table of bytes per parameter per storage kind; a quantized kind applies to the denoiser's
`nn.Linear` weights (what bitsandbytes replaces), everything else keeps its dtype. New storage
kinds (fp8 bases, quantized text encoders) are a row here plus the recipe key that selects it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Bytes per parameter. nf4: 4 bits + an 8-bit absmax per 64 weights + (double quantization)
# an fp32 absmax per 256 of those; int8: LLM.int8 keeps an fp32 scale per output row, counted
# separately (row_scale_bytes); fp8: one byte, a scale per tensor.
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "nf4": 0.5 + 1 / 64 + 4 / (64 * 256),
}
QUANTIZED = ("nf4", "int8", "fp8")
DTYPE_KIND = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Training on a bitsandbytes NF4 base allocates more than the traced bf16 step shows (its
# kernels are opaque to the meta trace): 0.14 bytes per quantized parameter, fitted to the one
# measured run (FLUX.1-dev NF4 on an H100, docs/BENCHMARKS.md). int8 has no measurement yet.
FITTED_TRAINING_OVERHEAD = {"nf4": 0.14}

# 8-bit AdamW (bitsandbytes): tensors of at least this many elements keep uint8 moments with an
# fp32 absmax per 256-element block; smaller ones keep fp32 moments.
ADAM8_MIN_SIZE = 4096
ADAM8_BLOCK = 256


@dataclass
class Stored:
    """One component's parameters as stored."""

    params: int
    bytes: int
    kind: str  # dtype or quantized kind of its (Linear) weights
    quantized_params: int = 0


def stored(module: nn.Module, quantize: str = "none") -> Stored:
    """Parameters and buffers in their dtypes; with `quantize`, Linear weights in that kind."""
    kinds = {}
    total = 0.0
    quantized_ids = set()
    if quantize in QUANTIZED:
        for name, layer in module.named_modules():
            if isinstance(layer, nn.Linear) and not is_adapter(name):
                weight = layer.weight
                quantized_ids.add(id(weight))
                total += weight.numel() * BYTES_PER_PARAM[quantize]
                if quantize == "int8":
                    total += weight.shape[0] * 4  # the fp32 scale per output row
    params = 0
    for name, param in module.named_parameters():
        if is_adapter(name):
            continue
        params += param.numel()
        if id(param) not in quantized_ids:
            total += param.numel() * param.element_size()
            kinds[DTYPE_KIND.get(param.dtype, str(param.dtype))] = True
    for buffer in module.buffers():
        total += buffer.numel() * buffer.element_size()
    kind = quantize if quantized_ids else "+".join(kinds) or "none"
    quantized = sum(p.numel() for p in module.parameters() if id(p) in quantized_ids)
    return Stored(params, int(total), kind, quantized)


def is_adapter(name: str) -> bool:
    """A LoRA / LoHa / LoKr parameter or layer (counted as the adapter, not the base)."""
    from tuner.adapters.lora import ADAPTER_MARKERS

    return any(marker in name for marker in ADAPTER_MARKERS)


def lora_parameters(modules) -> list[nn.Parameter]:
    """The trainable (LoRA) parameters of the trained modules."""
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def factored(shape) -> tuple[int, int]:
    """Adafactor / CAME's row and column statistics of a tensor of >= 2 dims (last two)."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows, rows // shape[-2] * shape[-1]


def blockwise_8bit(n: int) -> int:
    """One bitsandbytes 8-bit moment of an n-element tensor: uint8 plus an fp32 absmax per
    block, or fp32 under the size threshold."""
    return n + -(-n // ADAM8_BLOCK) * 4 if n >= ADAM8_MIN_SIZE else n * 4


def optimizer_state_bytes(params: list[nn.Parameter], optimizer: str) -> int:
    """What the optimizer holds after its first step, as torch and each package allocate it
    (fp32 parameters; tests/planning pins every row against the real optimizer)."""
    numels = [p.numel() for p in params]
    if optimizer == "adamw":  # exp_avg, exp_avg_sq, a 4-byte step tensor
        return sum(2 * n * 4 + 4 for n in numels)
    if optimizer in ("adamw8bit", "lion8bit"):  # two moments / Lion's one; shared code books
        moments = 2 if optimizer == "adamw8bit" else 1
        total = sum(moments * blockwise_8bit(n) for n in numels)
        any_8bit = any(n >= ADAM8_MIN_SIZE for n in numels)
        return total + (moments * 256 * 4 if any_8bit else 0)
    if optimizer == "prodigy":  # exp_avg, exp_avg_sq, s, p0 (the start point)
        return sum(4 * n * 4 for n in numels)
    if optimizer == "adamw_schedulefree":  # z and exp_avg_sq
        return sum(2 * n * 4 for n in numels)
    if optimizer in ("adafactor", "came"):
        total = 0
        for p in params:
            # Adafactor (beta1 None): second moments only, factored for >= 2 dims; CAME adds
            # a first moment and the factored residual statistics. Both keep an RMS scalar.
            if p.dim() >= 2:
                rows, cols = factored(p.shape)
                total += (rows + cols) * 4 * (2 if optimizer == "came" else 1)
            else:
                total += p.numel() * 4
            total += (p.numel() * 4 if optimizer == "came" else 0) + 4
        return total
    raise ValueError(f"no state model for optimizer {optimizer!r}")


def gradient_bytes(params: list[nn.Parameter]) -> int:
    """LoRA gradients: the parameters' own dtype (fp32)."""
    return sum(p.numel() * p.element_size() for p in params)
