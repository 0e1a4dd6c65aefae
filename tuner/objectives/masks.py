"""The masked loss: per-element squared error weighted by the image's mask on the latent grid.

weight = unmasked_weight + (1 - unmasked_weight) * mask, broadcast over channels (and frames).
Each sample's loss is its weighted mean, sum(weight * error) / sum(weight) over its elements,
so the loss keeps the scale of the plain MSE whatever the subject's area (an all-white mask
gives exactly the plain MSE), and a small subject is not trained at a smaller step size. The
objective's per-sample weight (min-SNR, flow weighting) is constant over a sample's elements,
so it multiplies every element before the mean: the same as multiplying the sample's mean.
"""

from __future__ import annotations

import torch

from tuner.data.masks import mask_to_grid


def element_weights(mask: torch.Tensor, like: torch.Tensor, unmasked_weight: float):
    """The (batch, 1, ..., h, w) weight of every element of `like` (batch, C, [T,] h, w)."""
    grid = mask_to_grid(mask.float(), tuple(like.shape[-2:]))  # (batch, 1, h, w)
    weight = unmasked_weight + (1.0 - unmasked_weight) * grid
    return weight.reshape(weight.shape[0], *([1] * (like.dim() - 3)), *like.shape[-2:])


def masked_mean(error, weight, mask, unmasked_weight: float) -> torch.Tensor:
    """Per-sample masked mean of the per-element loss `error` (fp32, any train.loss), times
    the objective's per-sample weight; shape (batch,)."""
    elements = element_weights(mask, error, unmasked_weight).expand_as(error)
    if weight is not None:
        error = error * weight.float().reshape(-1, *([1] * (error.dim() - 1)))
    total = (error * elements).flatten(1).sum(1)
    # An all-black crop with unmasked_weight 0 has no weight: its loss is 0, not NaN.
    return total / elements.flatten(1).sum(1).clamp_min(1e-8)


def masked_mse(pred, target, weight, mask, unmasked_weight: float) -> torch.Tensor:
    """masked_mean of the squared error."""
    return masked_mean((pred.float() - target.float()).pow(2), weight, mask, unmasked_weight)
