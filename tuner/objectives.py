"""Training objectives: what noisy input the denoiser sees, what it should predict, and how
each sample's loss is weighted. The math follows diffusers' schedulers and training_utils."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_snr


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


class DDPMObjective:
    """Discrete-time DDPM: epsilon or v-prediction, optional min-SNR-gamma weighting."""

    def __init__(self, scheduler, noise_offset: float = 0.0, min_snr_gamma: float | None = None):
        self.scheduler = scheduler
        self.noise_offset = noise_offset
        self.min_snr_gamma = min_snr_gamma
        self.prediction_type = scheduler.config.prediction_type
        self.num_timesteps = scheduler.config.num_train_timesteps

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        if self.min_snr_gamma is None:
            return None
        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        # Min-SNR (Hang et al. 2023); v-prediction's loss already carries a factor snr + 1.
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def sample(
        self, latents: torch.Tensor, generator: torch.Generator, share: tuple[int, int] = (0, 1)
    ) -> TrainingInputs:
        noise_gen, time_gen, offset_gen = streams(generator, 3)
        noise = sample_noise(latents, noise_gen, self.noise_offset, share, offset_gen)
        timesteps = shared_draw(
            lambda n: torch.randint(
                0, self.num_timesteps, (n,), generator=time_gen, device=latents.device
            ),
            latents.shape[0],
            share,
        )
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return TrainingInputs(
            noisy, timesteps, self.target(latents, noise, timesteps), self.weight(timesteps)
        )


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """Per-sample MSE (fp32), weighted, shape (batch,). The caller reduces."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample * weight.float() if weight is not None else per_sample
