"""What the memory kit's offloading leaves on the GPU, from the meta model's shapes.

Block swap (`train.offload_blocks: N`, training/block_swap.py) keeps the first N blocks' base
Linear weights in host memory and holds at most two blocks' copies on the device (the running
one and the prefetched one). Streamed text encoders (`model.text_encoder_offload`,
families/text_encoders.py) bring everything but their repeated layers to the device for the
phase, and one layer at a time.
"""

from __future__ import annotations

from torch import nn

from tuner.planning import storage
from tuner.training.block_swap import RESIDENT_BLOCKS, base_linears


def linear_weight_bytes(layer: nn.Linear, quantize: str) -> int:
    """A base Linear weight as stored: in the quantized kind, or in its own dtype."""
    weight = layer.weight
    if quantize not in storage.QUANTIZED:
        return weight.numel() * weight.element_size()
    scales = weight.shape[0] * 4 if quantize == "int8" else 0  # int8's fp32 scale per row
    return int(weight.numel() * storage.BYTES_PER_PARAM[quantize]) + scales


def swapped_blocks(family, denoiser: nn.Module, n: int, quantize: str) -> tuple[int, int]:
    """(bytes that leave the device, bytes held on it for them) when the first n blocks swap.
    The held part is the two largest of those blocks: an upper bound on any two in a row."""
    if n <= 0:
        return 0, 0
    blocks = family.blocks(denoiser)[:n]
    per_block = [sum(linear_weight_bytes(m, quantize) for m in base_linears(b)) for b in blocks]
    return sum(per_block), sum(sorted(per_block)[-RESIDENT_BLOCKS:])


def block_count(family, denoiser: nn.Module) -> int:
    return len(family.blocks(denoiser) or [])


def streamed_encoder_parts(encoder: nn.Module, kind: str) -> tuple[int, int]:
    """(bytes on the device for the whole phase, bytes of its largest layer) of a streamed
    encoder: everything but its repeated layers stays for the phase, a layer visits alone."""
    from tuner.families.text_encoders import layer_lists

    whole = storage.stored(encoder, kind).bytes
    layers = [storage.stored(layer, kind).bytes for ml in layer_lists(encoder) for layer in ml]
    return whole - sum(layers), max(layers, default=0)


def encoding_bytes(encoders: dict[str, nn.Module], kind: str, streamed: bool, one_at_a_time):
    """The encoders' weights on the device while prompts are encoded."""
    if not encoders:
        return 0
    if not streamed:
        sizes = [storage.stored(m, kind).bytes for m in encoders.values()]
        return max(sizes) if one_at_a_time else sum(sizes)
    parts = [streamed_encoder_parts(m, kind) for m in encoders.values()]
    if one_at_a_time:
        return max(stay + layer for stay, layer in parts)
    return sum(stay for stay, _ in parts) + max(layer for _, layer in parts)
