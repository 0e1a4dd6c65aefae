"""The DDPM objective (SD 1.x/2.x, SDXL): epsilon or v-prediction over the discrete noise
schedule, optional min-SNR-gamma weighting. The math follows diffusers' schedulers."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from tuner.objectives.common import LossSpec, TrainingInputs, sample_noise, shared_draw, streams


class DDPMObjective:
    """Discrete-time DDPM: epsilon or v-prediction, optional min-SNR-gamma weighting."""

    def __init__(
        self,
        scheduler,
        noise_offset: float = 0.0,
        min_snr_gamma: float | None = None,
        loss: LossSpec | None = None,
    ):
        self.scheduler = scheduler
        self.loss = loss or LossSpec()
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

    def noise_ratio(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise std over signal std at the timesteps: sqrt((1 - alpha_bar) / alpha_bar)."""
        alpha_bar = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return ((1 - alpha_bar) / alpha_bar).sqrt()

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
            noisy,
            timesteps,
            self.target(latents, noise, timesteps),
            self.weight(timesteps),
            self.loss.c_at(timesteps, self.num_timesteps, self.noise_ratio),
        )


def ddpm_objective(scheduler, train) -> DDPMObjective:
    """The recipe's objective over a model's noise schedule. Training noise follows the DDPM
    forward process over the same betas and prediction type whatever sampler the model ships
    (SDXL's Euler scheduler adds noise in sigma space)."""
    return DDPMObjective(
        DDPMScheduler.from_config(scheduler.config),
        noise_offset=train.noise_offset,
        min_snr_gamma=train.min_snr_gamma,
        loss=LossSpec.of(train),
    )
