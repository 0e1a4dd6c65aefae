"""HiDream's mixture-of-experts FFN on the meta device, for `tuner plan`.

A meta tensor has no values, so routing cannot be read: diffusers' training path would send
every token to every expert (a boolean mask that is all true on meta, 4x the real work) and
its inference path needs `bincount`, which has no meta kernel. While planning, the FFN routes
as a balanced router would: each routed expert gets an equal share of the token x top-k rows,
the mean load of real routing; the shared expert sees every token, as in diffusers. Shapes,
dtypes and what autograd keeps are those of the training path (the gathered rows are copies,
as boolean indexing makes them). The patch grid the inference path reads back is kept on the
CPU, where it has values.
"""

from __future__ import annotations

import contextlib

import torch


def balanced_forward(self, x: torch.Tensor) -> torch.Tensor:
    wtype, identity, shape = x.dtype, x, x.shape
    _, topk_weight, _ = self.gate(x)
    rows = x.reshape(-1, shape[-1]).repeat_interleave(self.num_activated_experts, dim=0)
    share = -(-rows.shape[0] // len(self.experts))
    y = torch.empty_like(rows, dtype=wtype)
    for i, expert in enumerate(self.experts):
        start, end = i * share, min((i + 1) * share, rows.shape[0])
        if start < end:
            y[start:end] = expert(rows[start:end].clone()).to(dtype=wtype)
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    return y.view(*shape).to(dtype=wtype) + self.shared_experts(identity)


def patchify_with_known_sizes(original):
    """patchify keeps the patch grid as a tensor on the input's device, which the inference
    unpatchify reads back; on meta the values are gone, so the grid is kept on the CPU."""

    def patchify(self, hidden_states):
        out = original(self, hidden_states)
        batch, _, height, width = hidden_states.shape
        p = self.config.patch_size
        sizes = torch.tensor([[height // p, width // p]] * batch, dtype=torch.int64)
        return (*out[:2], sizes, *out[3:])

    return patchify


@contextlib.contextmanager
def balanced_routing():
    from diffusers.models.transformers import transformer_hidream_image as hidream

    moe, model = hidream.MOEFeedForwardSwiGLU, hidream.HiDreamImageTransformer2DModel
    originals = moe.forward, model.patchify
    moe.forward = balanced_forward
    model.patchify = patchify_with_known_sizes(model.patchify)
    try:
        yield
    finally:
        moe.forward, model.patchify = originals
