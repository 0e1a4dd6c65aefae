"""What every objective shares: the training inputs of one batch, noise drawn for the global
batch (so N processes see what one would), independent draw streams, and the weighted loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TrainingInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None  # per-sample loss weight, shape (batch,)
    huber_c: torch.Tensor | None = None  # per-sample c of the (pseudo-)Huber losses


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


@dataclass(frozen=True)
class LossSpec:
    """train.loss and its Huber settings (kohya's sd-scripts names and meanings).

    huber:     2c (sqrt(d^2 + c^2) - c)   pseudo-Huber: ~d^2 for |d| << c, ~2c|d| beyond
    smooth_l1: 2  (sqrt(d^2 + c^2) - c)   the same curve without the factor c: ~d^2/c, ~2|d|
    The schedule makes c depend on the timestep ("Improving Diffusion Models's Data-Corruption
    Resistance using Scheduled Pseudo-Huber Loss", Khrapov et al. 2024): near-quadratic where
    the input is almost clean, robust (l1-like) where it is mostly noise.
    """

    kind: str = "mse"  # mse | huber | smooth_l1 | l1
    huber_c: float = 0.1
    schedule: str = "snr"  # constant | exponential | snr

    @classmethod
    def of(cls, train) -> LossSpec:
        # getattr: callers may pass a minimal train-like object (tests, benchmarks): mse.
        return cls(
            getattr(train, "loss", "mse"),
            getattr(train, "huber_c", 0.1),
            getattr(train, "huber_schedule", "snr"),
        )

    def c_at(self, timesteps: torch.Tensor, num_timesteps: int, noise_ratio) -> torch.Tensor | None:
        """Per-sample c. noise_ratio: a callable giving noise std / signal std at the timesteps
        (DDPM: sqrt((1 - alpha_bar) / alpha_bar); flow: sigma / (1 - sigma))."""
        if self.kind not in ("huber", "smooth_l1"):
            return None
        t = timesteps.float()
        if self.schedule == "constant":
            return torch.full_like(t, self.huber_c)
        if self.schedule == "exponential":
            # c = 1 at t = 0, falling exponentially to huber_c at t = num_timesteps.
            return torch.exp(math.log(self.huber_c) * t / num_timesteps)
        # snr: c = (1 - huber_c) / (1 + ratio)^2 + huber_c, from 1 (clean) to huber_c (noise).
        return (1 - self.huber_c) / (1 + noise_ratio(timesteps).float()) ** 2 + self.huber_c


def elementwise_loss(pred, target, kind: str = "mse", huber_c: torch.Tensor | None = None):
    """The loss at every element (fp32). huber_c: shape (batch,), for huber / smooth_l1."""
    diff = pred.float() - target.float()
    if kind == "mse":
        return diff.pow(2)
    if kind == "l1":
        return diff.abs()
    c = huber_c.float().view(-1, *([1] * (diff.ndim - 1)))
    # 2 (sqrt(d^2 + c^2) - c), written without the cancellation that loses it for c >> |d|.
    square = diff.pow(2)
    curve = 2 * square / (torch.sqrt(square + c.pow(2)) + c)
    if kind == "huber":
        return c * curve
    if kind == "smooth_l1":
        return curve
    raise ValueError(f"unknown loss {kind!r}")


def weighted_loss(pred, target, weight, loss: LossSpec | None = None, huber_c=None):
    """Per-sample loss (mean over each sample's elements), weighted (min-SNR, flow weighting),
    shape (batch,). The caller reduces."""
    kind = loss.kind if loss is not None else "mse"
    per_sample = elementwise_loss(pred, target, kind, huber_c).flatten(1).mean(1)
    return per_sample * weight.float() if weight is not None else per_sample


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None):
    """Per-sample MSE (fp32), weighted, shape (batch,)."""
    return weighted_loss(pred, target, weight)
