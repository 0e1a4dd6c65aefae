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


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, device=latents.device,
                        dtype=latents.dtype)
    if offset:
        # Noise offset: a per-channel constant shift lets the model learn very dark/bright images.
        b, c = latents.shape[:2]
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=generator,
                                             device=latents.device, dtype=latents.dtype)
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

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> TrainingInputs:
        noise = sample_noise(latents, generator, self.noise_offset)
        timesteps = torch.randint(0, self.num_timesteps, (latents.shape[0],),
                                  generator=generator, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return TrainingInputs(noisy, timesteps, self.target(latents, noise, timesteps),
                              self.weight(timesteps))


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """Per-sample MSE (fp32), weighted, shape (batch,). The caller reduces."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample * weight.float() if weight is not None else per_sample
