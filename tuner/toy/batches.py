"""Training batches for the toy base model, rendered in DataLoader workers.

Batch `step` is a pure function of (seed, stage, step), so the result does not depend on
how many workers render it: worker k renders steps k, k+W, ... and the DataLoader hands
them back in order. On a GPU host the renders would otherwise starve the GPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tuner.toy import world
from tuner.toy.tokenizer import MAX_LENGTH

VAE_STAGE, UNET_STAGE = 0, 2  # stream ids inside the seed; 1 is the latent-scale batch


def pixels_uint8(specs) -> torch.Tensor:
    """Rendered specs as a uint8 NCHW tensor (4x less to ship between processes)."""
    arr = np.stack([np.asarray(world.render(s)) for s in specs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def training_caption(spec: world.Spec, rng: np.random.Generator) -> str:
    """Full caption mostly; 10% empty (for CFG), 10% without colour, 10% without background,
    5% the shape alone, so that class prompts like "a circle" or "a circle on a blue
    background" mean something."""
    u = rng.random()
    if u < 0.1:
        return ""
    if u < 0.2:
        return world.caption(spec, with_color=False)
    if u < 0.3:
        return world.caption(spec, with_background=False)
    if u < 0.35:
        return world.caption(spec, with_color=False, with_background=False)
    return world.caption(spec)


class WorldBatches(IterableDataset):
    """VAE batches (whole world, pixels only) or UNet batches (base world, pixels + ids)."""

    def __init__(
        self, stage: int, seed: int, steps: int, batch_size: int, tokenizer=None, start: int = 0
    ):
        self.stage, self.seed, self.steps, self.batch_size = stage, seed, steps, batch_size
        self.tokenizer, self.start = tokenizer, start

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, self.stage, step])
        if self.stage == VAE_STAGE:
            return pixels_uint8([world.mixed_spec(rng) for _ in range(self.batch_size)])
        specs = [world.sample_spec(rng) for _ in range(self.batch_size)]
        captions = [training_caption(s, rng) for s in specs]
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pixels_uint8(specs), ids

    def __iter__(self):
        info = get_worker_info()
        first, stride = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + first, self.steps, stride):
            yield self.batch(step)


def loader(dataset: WorldBatches, workers: int, pin: bool) -> DataLoader:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after use
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )
