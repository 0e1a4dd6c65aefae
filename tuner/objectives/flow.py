"""The flow-matching objective (SD3/3.5, Flux.1): rectified flow between data and noise.

    x_t = (1 - sigma) * x0 + sigma * noise,   target = noise - x0   (the velocity)

Conventions are those of diffusers' `FlowMatchEulerDiscreteScheduler`: timesteps are
sigma * num_train_timesteps, a fixed shift maps sigma -> shift*sigma / (1 + (shift-1)*sigma), and a
resolution-dependent shift maps sigma through the scheduler's `time_shift(mu, 1, sigma)` with mu
from the image sequence length exactly as the Flux pipeline's `calculate_shift`. Sigmas are drawn
continuously (not snapped to the 1000-step table), so every draw is a valid scheduler sigma.
"""

from __future__ import annotations

import math

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from tuner.objectives.common import LossSpec, TrainingInputs, sample_noise, shared_draw


class FlowMatchObjective:
    """Draws sigmas, mixes data and noise, and weights each sample's loss.

    sampling: 'uniform' | 'logit_normal' (mean, std) | 'mode' (mode_scale) | 'sigmoid'
    (kohya's sigmoid(std * N(0, 1)), i.e. logit-normal centred at 0). shift: a fixed shift, or
    None with resolution_shift=True for the Flux shift computed per batch from its latent size.
    """

    def __init__(
        self,
        scheduler,
        *,
        sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        resolution_shift: bool = False,
        weighting: str = "none",
        noise_offset: float = 0.0,
        patch_size: int = 2,
        loss: LossSpec | None = None,
    ):
        self.scheduler = scheduler
        self.loss = loss or LossSpec()
        self.sampling, self.weighting = sampling, weighting
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.shift, self.resolution_shift = shift, resolution_shift
        self.noise_offset = noise_offset
        self.patch_size = patch_size
        self.num_timesteps = scheduler.config.num_train_timesteps

    # ---- sigma ---------------------------------------------------------------------------
    def draw_u(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """Unshifted sigmas in [0, 1] from the sampling density (diffusers' helper)."""
        scheme, mean = self.sampling, self.logit_mean
        if scheme == "sigmoid":
            scheme, mean = "logit_normal", 0.0
        elif scheme == "uniform":
            scheme = "none"  # diffusers' name for plain U(0, 1)
        return compute_density_for_timestep_sampling(
            scheme,
            batch,
            logit_mean=mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )

    def image_seq_len(self, latent_shape) -> int:
        height, width = latent_shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size)

    def mu(self, latent_shape) -> float:
        config = self.scheduler.config
        return calculate_shift(
            self.image_seq_len(latent_shape),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def shift_sigmas(self, u: torch.Tensor, latent_shape) -> torch.Tensor:
        if self.resolution_shift:
            mu = self.mu(latent_shape)
            # The scheduler's exponential time shift: e^mu / (e^mu + (1/u - 1)).
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    # ---- training inputs -----------------------------------------------------------------
    def weight(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        if self.weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(self.weighting, sigmas=sigmas)

    def inputs_at(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> TrainingInputs:
        """The training inputs at given sigmas (one per sample)."""
        s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise
        timesteps = sigmas * self.num_timesteps
        huber_c = self.loss.c_at(timesteps, self.num_timesteps, lambda _: self.noise_ratio(sigmas))
        return TrainingInputs(noisy, timesteps, noise - latents, self.weight(sigmas), huber_c)

    @staticmethod
    def noise_ratio(sigmas: torch.Tensor) -> torch.Tensor:
        """Noise std over signal std of x_t = (1 - sigma) x0 + sigma noise."""
        return sigmas / (1 - sigmas).clamp_min(1e-6)

    def sample(
        self, latents: torch.Tensor, generator: torch.Generator, share: tuple[int, int] = (0, 1)
    ) -> TrainingInputs:
        """share = (rank, world): draws cover the global batch, so N processes see what one
        process with N times the batch would."""
        noise = sample_noise(latents, generator, self.noise_offset, share)
        u = shared_draw(
            lambda n: self.draw_u(n, generator, latents.device), latents.shape[0], share
        )
        return self.inputs_at(latents, noise, self.shift_sigmas(u, latents.shape))


def build_flow_objective(
    scheduler,
    flow,
    *,
    noise_offset: float = 0.0,
    default_shift: float,
    default_resolution_shift: bool,
    loss: LossSpec | None = None,
) -> FlowMatchObjective:
    """The recipe's train.flow section -> objective. An explicit train.flow.shift turns the
    resolution shift off unless train.flow.resolution_shift asks for it."""
    resolution_shift = flow.resolution_shift
    if resolution_shift is None:
        resolution_shift = default_resolution_shift and flow.shift is None
    return FlowMatchObjective(
        scheduler,
        sampling=flow.timestep_sampling,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
        shift=flow.shift if flow.shift is not None else default_shift,
        resolution_shift=resolution_shift,
        weighting=flow.loss_weighting,
        noise_offset=noise_offset,
        loss=loss,
    )
