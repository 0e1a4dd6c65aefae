"""What every objective shares: the training inputs of one batch, noise drawn for the global
batch (so N processes see what one would), independent draw streams, and the weighted loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None  # per-sample loss weight, shape (batch,)


def shared_draw(draw, batch: int, share: tuple[int, int]):
    """Draw for the whole global batch and keep this process's slice, so N processes with
    batch b get exactly the noise 1 process with batch N*b gets. share = (rank, world)."""
    rank, world = share
    return draw(batch * world)[rank * batch : (rank + 1) * batch]


def streams(generator: torch.Generator, count: int) -> list[torch.Generator]:
    """Independent generators per kind of draw (noise, timesteps, ...), derived from the step's
    generator. Separate streams keep sample i's draws the same whatever the batch size, so
    adding DreamBooth prior samples to a batch leaves the instance samples' noise unchanged."""
    base = generator.initial_seed()
    return [
        torch.Generator(generator.device).manual_seed(base * 7919 + 104_729 * (i + 1))
        for i in range(count)
    ]


def sample_noise(
    latents: torch.Tensor,
    generator: torch.Generator,
    offset: float,
    share: tuple[int, int] = (0, 1),
    offset_generator: torch.Generator | None = None,
) -> torch.Tensor:
    b, c = latents.shape[:2]
    kwargs = {"device": latents.device, "dtype": latents.dtype}
    noise = shared_draw(
        lambda n: torch.randn((n, *latents.shape[1:]), generator=generator, **kwargs), b, share
    )
    if offset:
        # Noise offset: a per-channel constant shift lets the model learn very dark/bright images.
        shift = shared_draw(
            lambda n: torch.randn((n, c, 1, 1), **kwargs, generator=offset_generator or generator),
            b,
            share,
        )
        noise = noise + offset * shift
    return noise


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """Per-sample MSE (fp32), weighted, shape (batch,). The caller reduces."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample * weight.float() if weight is not None else per_sample
