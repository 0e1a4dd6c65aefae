"""Traced parts of the plan: one training micro-step, a sampling step, caching's encoders.

Each trace runs on the meta model (tuner/planning/trace.py says how); results are cached by
the settings that change them (checkpointing, batch), so trying switches re-traces only what
a switch changes.
"""

from __future__ import annotations

import contextlib

import torch

from tuner.adapters import lora
from tuner.data.pairs import reference_size
from tuner.planning import trace
from tuner.planning.build import MetaModel
from tuner.recipe import Recipe

CACHE_BATCH = 8  # build_cache's encoding batch


class Tracer:
    def __init__(self, meta: MetaModel, recipe: Recipe):
        self.meta, self.recipe = meta, recipe
        self.family, self.comps = meta.family, meta.comps
        self.comps.denoiser.requires_grad_(False)
        for module in self.comps.frozen_modules().values():
            module.requires_grad_(False).eval()
        self.trained = lora.inject(self.comps, recipe.adapter, self.family)
        self.autocast = self.comps.dtype if self.comps.dtype != torch.float32 else None
        self._steps: dict[tuple, tuple[int, float | None]] = {}

    def _meta_context(self):
        """Value tests answered as the upper bound, and the family's own meta stand-ins."""
        stack = contextlib.ExitStack()
        stack.enter_context(trace.meta_truth_tests())
        stack.enter_context(getattr(self.family, "meta_trace", contextlib.nullcontext)())
        return stack

    # ---- inputs --------------------------------------------------------------------------
    def _inputs(self, batch: int, size: tuple[int, int]):
        family, comps = self.family, self.comps
        with torch.device("meta"), torch.no_grad(), self._meta_context():
            cond = family.encode_prompts(
                comps, ["a photo"] * batch, **references(family, batch, size)
            )
            shape = family.latent_shape(comps, size)
        noisy = torch.zeros((batch, *shape), device="meta")
        timesteps = torch.full((batch,), 500.0, device="meta")
        sizes = torch.tensor([[size[1], size[0]]] * batch, dtype=torch.float32, device="meta")
        extra = {
            "original_size": sizes,
            "target_size": sizes,
            "crop_top_left": torch.zeros((batch, 2), device="meta"),
        }
        if family.spec.controls:  # editing: cached reference latents, sized as in training
            area = family.spec.reference_area
            at = reference_size(area, size) if area else size
            reference = torch.zeros((batch, *family.latent_shape(comps, at)), device="meta")
            extra["control_latents"] = [reference.clone() for _ in range(family.spec.controls)]
        return noisy, timesteps, cond, extra

    # ---- training ------------------------------------------------------------------------
    def training_step(
        self, batch: int, checkpointing: bool, size: tuple[int, int], flops: bool = False
    ) -> tuple[int, float | None]:
        """(peak bytes above the weights, FLOPs or None) of one forward + backward."""
        key = (batch, checkpointing, size, flops)
        if key not in self._steps:
            self._steps[key] = self._trace_step(batch, checkpointing, size, flops)
        return self._steps[key]

    def _trace_step(self, batch, checkpointing, size, flops):
        denoiser = self.comps.denoiser
        if checkpointing:
            denoiser.enable_gradient_checkpointing(trace.checkpointing(self.autocast))
        else:
            denoiser.disable_gradient_checkpointing()
        denoiser.train()
        noisy, timesteps, cond, extra = self._inputs(batch, size)
        try:
            with trace.traced(self.autocast, flops) as (live, counter), self._meta_context():
                pred = self.family.predict(self.comps, noisy, timesteps, cond, extra)
                loss = ((pred.float() - noisy) ** 2).mean()
                # torch.autograd.backward, not loss.backward(): the autocast emulation must
                # stay on for checkpointed blocks recomputed in backward.
                torch.autograd.backward(loss)
        finally:
            for param in self.lora_params():
                param.grad = None
            denoiser.disable_gradient_checkpointing()
        return live.peak, (float(counter.get_total_flops()) if counter is not None else None)

    def lora_params(self) -> list[torch.nn.Parameter]:
        return lora.trainable_parameters(self.comps.denoiser) + [
            p
            for name, module in self.trained.items()
            if name != self.family.spec.denoiser
            for p in lora.trainable_parameters(module)
        ]

    # ---- inference -----------------------------------------------------------------------
    def denoiser_forward(self, batch: int, size: tuple[int, int]) -> int:
        """Peak above the weights of one sampling step (no gradients)."""
        self.comps.denoiser.eval()
        noisy, timesteps, cond, extra = self._inputs(batch, size)
        noisy = noisy.to(self.comps.dtype)
        traced = trace.traced(self.autocast, False)
        with torch.no_grad(), traced as (live, _), self._meta_context():
            self.family.predict(self.comps, noisy, timesteps, cond, extra)
        return live.peak

    def vae(self, batch: int, size: tuple[int, int], decode: bool) -> int:
        """Peak above the weights of encoding `batch` images (the cache) or decoding one."""
        vae = self.comps.vae
        shape = getattr(self.family, "decoded_latent_shape", self.family.latent_shape)(
            self.comps, size
        )
        dtype = next(vae.parameters()).dtype
        with torch.no_grad(), trace.traced(None, count_flops=False) as (live, _):
            if decode:
                latents = torch.zeros((1, *shape), device="meta", dtype=dtype)
                try:
                    vae.decode(latents)
                except (TypeError, RuntimeError, ValueError):  # a video VAE wants a frame axis
                    vae.decode(latents.unsqueeze(2))
            else:
                pixels = torch.zeros((batch, 3, size[1], size[0]), device="meta")
                self.family.encode_images(self.comps, pixels)
        return live.peak

    def text_encoders(self, batch: int, size: tuple[int, int] = (1024, 1024)) -> int:
        traced = trace.traced(None, count_flops=False)
        seen = references(self.family, batch, size)
        with torch.no_grad(), traced as (live, _), torch.device("meta"), self._meta_context():
            self.family.encode_prompts(self.comps, ["a photo"] * batch, **seen)
        return live.peak


def references(family, batch: int, size: tuple[int, int]) -> dict:
    """encode_prompts' `references` for a family whose prompt encoder reads them: a plain
    image of the target's size per prompt (only its size matters on the meta device)."""
    if not family.spec.prompt_reads_references:
        return {}
    from PIL import Image

    image = Image.new("RGB", size, (127, 127, 127))
    return {"references": [[image] * family.spec.controls for _ in range(batch)]}
