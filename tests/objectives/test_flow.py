"""The flow-matching objective against diffusers' own scheduler and pipeline math."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from tuner.builtins.flux import flux_scheduler
from tuner.builtins.sd3 import sd3_scheduler
from tuner.objectives.flow import FlowMatchObjective, build_flow_objective
from tuner.recipe import TrainSection

U = torch.tensor([0.03, 0.25, 0.5, 0.8, 0.97])


def fixed_tensors(batch: int, size: int = 8):
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(batch, 16, size, size, generator=gen)
    noise = torch.randn(batch, 16, size, size, generator=gen)
    return latents, noise


def scheduler_at(scheduler, u: torch.Tensor, mu: float | None = None):
    """The scheduler's own sigmas/timesteps for the unshifted values u (its set_timesteps
    applies the fixed or the dynamic shift)."""
    scheduler.set_timesteps(sigmas=u.tolist(), mu=mu)
    return scheduler.sigmas[:-1], scheduler.timesteps


def test_fixed_shift_matches_the_scheduler_sigmas_and_scale_noise():
    scheduler = sd3_scheduler()
    objective = FlowMatchObjective(sd3_scheduler(), shift=scheduler.config.shift)
    latents, noise = fixed_tensors(len(U))
    sigmas = objective.shift_sigmas(U, latents.shape)
    inputs = objective.inputs_at(latents, noise, sigmas)

    expected_sigmas, expected_timesteps = scheduler_at(scheduler, U)
    torch.testing.assert_close(sigmas, expected_sigmas)
    torch.testing.assert_close(inputs.timesteps, expected_timesteps)
    # scale_noise looks each timestep up in the schedule: the scheduler's own forward process.
    torch.testing.assert_close(
        inputs.noisy, scheduler.scale_noise(latents, inputs.timesteps, noise)
    )


def test_target_is_the_velocity_the_euler_step_integrates():
    """Stepping from sigma to 0 along the target must land exactly on the clean latents."""
    objective = FlowMatchObjective(sd3_scheduler(), shift=3.0)
    latents, noise = fixed_tensors(1)
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(sigmas=[0.6])  # shifted inside, so compare through its table
    sigma = float(scheduler.sigmas[0])
    inputs = objective.inputs_at(latents, noise, torch.tensor([sigma]))
    stepped = scheduler.step(inputs.target, scheduler.timesteps[0], inputs.noisy).prev_sample
    torch.testing.assert_close(stepped, latents, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pixels", [512, 1024])
def test_resolution_shift_matches_the_flux_pipeline(pixels):
    """mu from the packed sequence length exactly as FluxPipeline computes it, then the
    scheduler's exponential time shift."""
    scheduler = flux_scheduler("dev")
    objective = FlowMatchObjective(flux_scheduler("dev"), resolution_shift=True)
    side = pixels // 8
    latents = torch.zeros(1, 16, side, side)
    packed_len = FluxPipeline._pack_latents(latents, 1, 16, side, side).shape[1]
    config = scheduler.config
    mu = calculate_shift(
        packed_len,
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift,
        config.max_shift,
    )
    assert objective.mu(latents.shape) == pytest.approx(mu)
    expected_sigmas, _ = scheduler_at(scheduler, U, mu=mu)
    torch.testing.assert_close(objective.shift_sigmas(U, latents.shape), expected_sigmas)


def test_resolution_shift_grows_with_resolution_and_hits_its_anchors():
    objective = FlowMatchObjective(flux_scheduler("dev"), resolution_shift=True)
    config = objective.scheduler.config
    # 256 and 4096 packed tokens (256^2 and 1024^2 pixels) are the two ends of the line.
    assert objective.mu((1, 16, 32, 32)) == pytest.approx(config.base_shift)
    assert objective.mu((1, 16, 128, 128)) == pytest.approx(config.max_shift)
    low = objective.shift_sigmas(U, (1, 16, 64, 64))
    high = objective.shift_sigmas(U, (1, 16, 128, 128))
    assert torch.all(high > low) and torch.all(low > U)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "sigmoid"])
def test_sigma_densities_are_diffusers_own(scheme):
    objective = FlowMatchObjective(
        sd3_scheduler(), sampling=scheme, logit_mean=0.3, logit_std=1.4, mode_scale=1.1
    )
    drawn = objective.draw_u(64, torch.Generator().manual_seed(5), "cpu")
    name = {"uniform": "none", "sigmoid": "logit_normal"}.get(scheme, scheme)
    mean = 0.0 if scheme == "sigmoid" else 0.3  # sigmoid: logit-normal centred at 0
    expected = compute_density_for_timestep_sampling(
        name,
        64,
        logit_mean=mean,
        logit_std=1.4,
        mode_scale=1.1,
        device="cpu",
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(drawn, expected)
    assert drawn.min() >= 0 and drawn.max() <= 1


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weighting_is_diffusers_own(weighting):
    objective = FlowMatchObjective(sd3_scheduler(), weighting=weighting)
    sigmas = objective.shift_sigmas(U, (1, 16, 8, 8))
    torch.testing.assert_close(
        objective.weight(sigmas), compute_loss_weighting_for_sd3(weighting, sigmas=sigmas)
    )
    assert FlowMatchObjective(sd3_scheduler()).weight(sigmas) is None


def test_sample_is_reproducible_from_the_generator():
    objective = FlowMatchObjective(flux_scheduler("dev"), resolution_shift=True)
    latents, _ = fixed_tensors(3)
    first = objective.sample(latents, torch.Generator().manual_seed(9))
    again = objective.sample(latents, torch.Generator().manual_seed(9))
    other = objective.sample(latents, torch.Generator().manual_seed(10))
    torch.testing.assert_close(first.noisy, again.noisy)
    torch.testing.assert_close(first.timesteps, again.timesteps)
    assert not torch.equal(first.timesteps, other.timesteps)
    # The target and the noisy input come from one noise draw: x_t + (1 - s) * v = noise.
    s = (first.timesteps / 1000).view(-1, 1, 1, 1)
    noise = first.noisy + (1 - s) * first.target
    torch.testing.assert_close(noise - first.target, latents, atol=1e-5, rtol=1e-5)


def test_recipe_defaults_per_family_scheduler():
    flow = TrainSection(steps=1).flow
    sd3 = build_flow_objective(
        sd3_scheduler(), flow, default_shift=3.0, default_resolution_shift=False
    )
    assert (sd3.shift, sd3.resolution_shift) == (3.0, False)
    dev = build_flow_objective(
        flux_scheduler("dev"), flow, default_shift=3.0, default_resolution_shift=True
    )
    assert dev.resolution_shift
    fixed = build_flow_objective(
        flux_scheduler("dev"),
        TrainSection(steps=1, flow={"shift": 2.0}).flow,
        default_shift=3.0,
        default_resolution_shift=True,
    )
    assert (fixed.shift, fixed.resolution_shift) == (2.0, False)
    forced = build_flow_objective(
        sd3_scheduler(),
        TrainSection(steps=1, flow={"resolution_shift": True}).flow,
        default_shift=3.0,
        default_resolution_shift=False,
    )
    assert forced.resolution_shift


def test_uniform_unshifted_sigmas_are_the_identity():
    objective = FlowMatchObjective(FlowMatchEulerDiscreteScheduler(shift=1.0), shift=1.0)
    torch.testing.assert_close(objective.shift_sigmas(U, (1, 16, 8, 8)), U)
    assert math.isclose(float(objective.shift_sigmas(torch.tensor([1.0]), (1, 16, 8, 8))), 1.0)


def test_two_processes_draw_what_one_process_with_twice_the_batch_draws():
    objective = FlowMatchObjective(flux_scheduler("dev"), resolution_shift=True, noise_offset=0.1)
    latents, _ = fixed_tensors(4)
    whole = objective.sample(latents, torch.Generator().manual_seed(3))
    halves = [
        objective.sample(
            latents[rank * 2 : (rank + 1) * 2], torch.Generator().manual_seed(3), (rank, 2)
        )
        for rank in (0, 1)
    ]
    torch.testing.assert_close(torch.cat([h.noisy for h in halves]), whole.noisy)
    torch.testing.assert_close(torch.cat([h.timesteps for h in halves]), whole.timesteps)
