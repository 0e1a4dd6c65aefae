"""train.loss: each loss is its formula; Huber's limits; the Huber schedules over timesteps;
min-SNR and flow weighting multiply the per-sample loss; every loss trains."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3, compute_snr

from tuner.builtins.parts import sd_scheduler
from tuner.builtins.sd3 import sd3_scheduler
from tuner.objectives.common import LossSpec, elementwise_loss, weighted_loss
from tuner.objectives.ddpm import DDPMObjective
from tuner.objectives.flow import FlowMatchObjective

PRED = torch.tensor([[0.5, -1.0, 3.0], [0.0, 2.0, -0.25]])
TARGET = torch.tensor([[0.0, 1.0, 2.5], [0.1, -2.0, 0.25]])
C = torch.tensor([0.1, 2.0])


def by_hand(kind: str) -> torch.Tensor:
    """The per-element formulas written out one number at a time."""
    rows = []
    for i in range(2):
        row = []
        for p, t in zip(PRED[i].tolist(), TARGET[i].tolist()):
            d, c = p - t, C[i].item()
            row.append(
                {
                    "mse": d * d,
                    "l1": abs(d),
                    "huber": 2 * c * (math.sqrt(d * d + c * c) - c),
                    "smooth_l1": 2 * (math.sqrt(d * d + c * c) - c),
                }[kind]
            )
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "smooth_l1"])
def test_each_loss_is_its_formula(kind):
    got = elementwise_loss(PRED, TARGET, kind, C)
    torch.testing.assert_close(got, by_hand(kind))
    per_sample = weighted_loss(PRED, TARGET, None, LossSpec(kind), C)
    torch.testing.assert_close(per_sample, by_hand(kind).mean(1))


def test_huber_is_l1_like_for_small_c_and_mse_like_for_large_c():
    d = PRED - TARGET
    small, large = torch.full((2,), 1e-4), torch.full((2,), 1e4)
    # huber = 2c (sqrt(d^2 + c^2) - c): ~2c|d| for c << |d|, ~d^2 for c >> |d|.
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, "huber", small) / 2e-4, d.abs(), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, "huber", large), d.pow(2), rtol=1e-3, atol=1e-3
    )
    # smooth_l1 = huber / c: ~2|d| and ~d^2 / c.
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, "smooth_l1", small), 2 * d.abs(), rtol=1e-3, atol=1e-3
    )
    torch.testing.assert_close(
        elementwise_loss(PRED, TARGET, "smooth_l1", large) * 1e4, d.pow(2), rtol=1e-3, atol=1e-3
    )


def test_huber_schedules_over_ddpm_timesteps():
    scheduler = sd_scheduler("epsilon")
    t = torch.tensor([0, 250, 500, 999])
    constant = LossSpec("huber", 0.2, "constant").c_at(t, 1000, None)
    assert constant.tolist() == pytest.approx([0.2] * 4)
    exponential = LossSpec("huber", 0.2, "exponential").c_at(t, 1000, None)
    assert exponential.tolist() == pytest.approx([0.2 ** (k / 1000) for k in t.tolist()])
    objective = DDPMObjective(scheduler, loss=LossSpec("huber", 0.2, "snr"))
    snr = objective.loss.c_at(t, 1000, objective.noise_ratio)
    alpha_bar = scheduler.alphas_cumprod[t].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    torch.testing.assert_close(snr.double(), 0.8 / (1 + sigma) ** 2 + 0.2, rtol=1e-5, atol=1e-6)
    assert snr[0] > 0.95 and snr[-1] < 0.21  # ~1 (quadratic) when clean, huber_c in noise
    assert (snr.diff() < 0).all() and (exponential.diff() < 0).all()
    assert LossSpec("mse").c_at(t, 1000, None) is None  # only the Huber losses have a c


def test_huber_composes_with_min_snr_weights():
    scheduler = sd_scheduler("epsilon")
    objective = DDPMObjective(scheduler, min_snr_gamma=5.0, loss=LossSpec("huber", 0.1, "snr"))
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    inputs = objective.sample(latents, torch.Generator().manual_seed(1))
    pred = torch.zeros_like(inputs.target)
    got = weighted_loss(pred, inputs.target, inputs.weight, objective.loss, inputs.huber_c)
    snr = compute_snr(scheduler, inputs.timesteps)
    min_snr = torch.clamp(snr, max=5.0) / snr
    plain = elementwise_loss(pred, inputs.target, "huber", inputs.huber_c).flatten(1).mean(1)
    torch.testing.assert_close(got, plain * min_snr)
    assert not torch.allclose(got, plain)  # the weights are not all 1


def test_huber_composes_with_flow_weighting():
    objective = FlowMatchObjective(
        sd3_scheduler(), weighting="sigma_sqrt", loss=LossSpec("smooth_l1", 0.1, "snr")
    )
    latents, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    inputs = objective.inputs_at(latents, noise, sigmas)
    expected_c = 0.9 / (1 + sigmas / (1 - sigmas)) ** 2 + 0.1
    torch.testing.assert_close(inputs.huber_c, expected_c)
    pred = torch.zeros_like(latents)
    got = weighted_loss(pred, inputs.target, inputs.weight, objective.loss, inputs.huber_c)
    weight = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=sigmas)
    plain = elementwise_loss(pred, inputs.target, "smooth_l1", expected_c).flatten(1).mean(1)
    torch.testing.assert_close(got, plain * weight)


def lora_b(result) -> dict[str, torch.Tensor]:
    return {k: v for k, v in result.trained["unet"].state_dict().items() if "lora_B" in k}


@pytest.mark.parametrize(
    "loss",
    [
        "huber",
        pytest.param("smooth_l1", marks=pytest.mark.slow),
        pytest.param("l1", marks=pytest.mark.slow),
    ],
)
def test_each_loss_trains(make_recipe, loss):
    """Two steps with min-SNR weighting: finite, and the adapter moves (lora_B starts at 0)."""
    from tuner.training.run import run_training

    got = lora_b(
        run_training(make_recipe("train.steps=2", "train.min_snr_gamma=5", f"train.loss={loss}"))
    )
    assert all(torch.isfinite(v).all() for v in got.values())
    assert any(v.abs().sum() > 0 for v in got.values())


@pytest.mark.slow
def test_the_losses_train_differently(make_recipe, tmp_path):
    from tuner.training.run import run_training

    runs = [
        lora_b(run_training(make_recipe("train.steps=2", f"train.loss={loss}")))
        for loss in ("mse", "huber")
    ]
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
