"""Builtin Qwen-Image-Edit models: `tiny-qwen-image-edit` / `tiny-qwen-image-edit-plus` (toy
size, seeded, offline tokenizer and processor) and `arch-qwen-image-edit` (the full 20B
transformer, Qwen2.5-VL-7B with its vision tower and the 16-channel VAE, random init, bf16).

Qwen-Image-Edit is Qwen-Image's architecture; what differs is the text side: the VL encoder
reads the reference image too, through a `Qwen2VLProcessor`. The offline tokenizer spells every
pre-tokenized piece of the editing template's system prompt as one token, so the prefix is the
64 tokens the pipeline drops (`prompt_template_encode_start_idx`), as with Qwen's own
vocabulary.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers import AddedToken
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

from tuner.builtins.parts import default_dtype
from tuner.builtins.qwen_image import (
    SPECIAL_TOKENS,
    build_tiny_qwen_image,
    qwen25_vl_7b_config,
    qwen_image_scheduler,
    qwen_image_transformer_config,
    tiny_text_encoder,
)
from tuner.builtins.tokenizers import _byte_symbols

# QwenImageEditPipeline.prompt_template_encode up to the user's turn (the part it drops).
EDIT_SYSTEM_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n"
)
# Qwen2.5-VL's preprocessor_config.json: 14 px patches, 2x2 merged, frames in pairs.
PATCH, MERGE, TEMPORAL = 14, 2, 2
VL_MIN_PIXELS, VL_MAX_PIXELS = 56 * 56, 12845056
# The toy processor's area cap: a reference reaches the tiny VL encoder as at most 8 x 8
# patches (16 tokens), so tests stay fast; the pipeline's own resize rules are unchanged.
TINY_VL_MAX_PIXELS = 112 * 112


def _pieces(text: str, pre_tokenizer) -> list[str]:
    found = []
    for part in re.split(r"(<\|[a-z_]+\|>)", text):
        if part.startswith("<|"):
            continue
        found += [piece for piece, _ in pre_tokenizer.pre_tokenize_str(part)]
    return found


def _tokenizer(symbols: list[str], merges: list[tuple[str, str]]) -> Qwen2Tokenizer:
    merged = [a + b for a, b in merges]
    tokens = list(dict.fromkeys(symbols + merged + list(SPECIAL_TOKENS)))
    tokenizer = Qwen2Tokenizer(
        vocab={token: i for i, token in enumerate(tokens)}, merges=merges, model_max_length=32768
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-tokenized piece: merge the best-ranked pair until none."""
    parts = list(piece)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


@lru_cache(maxsize=1)
def offline_edit_tokenizer() -> Qwen2Tokenizer:
    """Byte-level Qwen2 BPE whose merges spell each piece of the editing system prompt as one
    token. A piece still split by earlier merges (`co` from `color` inside ` consistency`)
    gets the merge of its first two current parts, until it is one token."""
    symbols = _byte_symbols()
    ranks: dict[tuple[str, str], int] = {}
    pre_tokenizer = _tokenizer(symbols, []).backend_tokenizer.pre_tokenizer
    for piece in _pieces(EDIT_SYSTEM_PREFIX, pre_tokenizer):
        while len(parts := _bpe(piece, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
    return _tokenizer(symbols, list(ranks))


class ImageOnlyVLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which needs torchvision; the editing
    pipelines give it images only."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


def vl_processor(tokenizer, max_pixels: int = VL_MAX_PIXELS) -> Qwen2VLProcessor:
    """Qwen2.5-VL's processor (the PIL image processor: no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    images = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        min_pixels=VL_MIN_PIXELS,
        max_pixels=max_pixels,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return ImageOnlyVLProcessor(image_processor=images, tokenizer=tokenizer)


def build_tiny_qwen_image_edit() -> dict:
    """tiny-qwen-image's transformer and VAE, and a 2-layer Qwen2.5-VL (with a 1-block vision
    tower) over the editing tokenizer."""
    modules = build_tiny_qwen_image()
    tokenizer = offline_edit_tokenizer()
    torch.manual_seed(12)
    modules.update(
        text_encoder=tiny_text_encoder(tokenizer),
        tokenizer=tokenizer,
        processor=vl_processor(tokenizer, TINY_VL_MAX_PIXELS),
    )
    return modules


def build_arch_qwen_image_edit() -> dict:
    """The full Qwen-Image-Edit architecture with random weights, built in bf16."""
    torch.manual_seed(0)
    tokenizer = offline_edit_tokenizer()
    with default_dtype(torch.bfloat16):
        return {
            "transformer": QwenImageTransformer2DModel(**qwen_image_transformer_config()),
            "vae": AutoencoderKLQwenImage(),
            "text_encoder": Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config()).eval(),
            "tokenizer": tokenizer,
            "processor": vl_processor(tokenizer),
            "scheduler": qwen_image_scheduler(),
        }
