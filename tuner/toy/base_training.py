"""Training loops of the toy base model (see tuner/toy/base.py): the VAE stage, then the
UNet + text-encoder stage, each on generator batches, seeded."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.nn import functional as F

from tuner.toy import world
from tuner.toy.batches import (
    UNET_STAGE,
    VAE_STAGE,
    WorldBatches,
    loader,
    pixels_uint8,
    to_unit_range,
)


def _autocast(device: str):
    # bf16 autocast on CUDA only; CPU stays fp32 (CPU bf16 is slow and changes results).
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    )


def _lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine to 10%

    return factor


def train_vae(vae, steps, device, seed=0, batch_size=32, lr=5e-4, log_every=100, workers=0):
    """Reconstruction (L1 + MSE) plus a small KL term that keeps latents smooth."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, min(200, steps // 10)))
    gen = torch.Generator(device).manual_seed(seed)
    start, total = time.time(), 0.0
    batches = loader(WorldBatches(VAE_STAGE, seed, steps, batch_size), workers, device != "cpu")
    for step, x in enumerate(batches):
        x = to_unit_range(x.to(device, non_blocking=True))
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(
                f"vae step {step + 1}/{steps} loss {total / n:.4f} "
                f"({(time.time() - start) / (step + 1):.3f}s/step)",
                flush=True,
            )
            total = 0.0
    vae.eval().requires_grad_(False)
    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    with torch.no_grad():
        rng = np.random.default_rng([seed, 1])
        x = to_unit_range(pixels_uint8([world.mixed_spec(rng) for _ in range(256)]).to(device))
        std = vae.encode(x).latent_dist.sample(generator=gen).float().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    print(f"vae latent std {std:.4f} -> scaling_factor {1.0 / std:.4f}")


@contextmanager
def swapped_in(params, replacement):
    """Temporarily load `replacement` tensors (the EMA) into `params`."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, r in zip(params, replacement, strict=True):
            p.copy_(r)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def train_unet(
    vae,
    text_encoder,
    tokenizer,
    unet,
    scheduler,
    steps,
    device,
    seed=0,
    batch_size=64,
    lr=5e-4,
    ema_decay=0.999,
    log_every=100,
    preview_every=0,
    preview=None,
    workers=0,
    time_limit=0.0,
):
    """Epsilon-prediction loss with min-SNR-5 weighting; EMA weights are what get saved."""
    vae.to(device)
    unet.to(device).train()
    text_encoder.to(device).train()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, min(500, steps // 10)))
    gen = torch.Generator(device).manual_seed(seed + 1)
    alphas = scheduler.alphas_cumprod.to(device)
    scale = vae.config.scaling_factor
    start, total = time.time(), 0.0
    data = WorldBatches(UNET_STAGE, seed, steps, batch_size, tokenizer)  # base world only
    for step, (x, ids) in enumerate(loader(data, workers, device != "cpu")):
        with torch.no_grad():
            x = to_unit_range(x.to(device, non_blocking=True))
            latents = vae.encode(x).latent_dist.sample(generator=gen) * scale
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen, device=device
        )
        with _autocast(device):
            hidden = text_encoder(ids.to(device, non_blocking=True))[0]
            pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample.float()
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=5.0) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        total += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(
                f"unet step {step + 1}/{steps} loss {total / n:.4f} lr "
                f"{sched.get_last_lr()[0]:.2e} ({(time.time() - start) / (step + 1):.3f}"
                "s/step)",
                flush=True,
            )
            total = 0.0
        if preview and preview_every and (step + 1) % preview_every == 0:
            with swapped_in(params, ema):
                unet.eval(), text_encoder.eval()
                preview(step + 1)
                unet.train(), text_encoder.train()
        if time_limit and time.time() - start > time_limit * 60:
            print(
                f"time limit: stopping after {step + 1} of {steps} steps; the result is "
                "not the reproducible full run",
                flush=True,
            )
            break
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
