"""The toy editing base (`builtin:toy-edit`): a tiny FLUX.1 Kontext that edits toy-world images.

The toy base (`builtin:toy`) is a Stable Diffusion UNet, which cannot read a reference image,
so editing LoRAs are measured on this second base, trained the same way (from scratch, flow
matching, EMA weights, reproducible from --seed): FluxKontextPipeline's modules at toy size,
with the toy base's VAE (frozen; it already codes every style), a small CLIP (pooled) and T5
(sequence) trained with the transformer over byte-level offline tokenizers.

It learns reference-conditioned edits of the base world: "keep it" (and the empty
instruction) copies the reference; "make it red", "make it a star", "put it on a blue
background" change one attribute and keep the rest. It never sees a style, so "make it hollow"
(datasets/toy-hollow) is something new for an editing LoRA to learn, and the judge can tell
whether the edit was applied (style) and the rest kept (shape, colour, background).

The step is the flux-kontext family's own forward (families.flux_kontext.kontext_forward),
so the base is trained on exactly the sequence the pipeline and the LoRA trainer build.

    tuner toy train-edit-base --out tuner/toy/weights/edit --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from tuner.builtins.flux import flux_scheduler
from tuner.builtins.parts import clip_config, t5_encoder
from tuner.builtins.tokenizers import offline_clip_tokenizer, offline_t5_tokenizer
from tuner.toy import world
from tuner.toy.base import TOY_WEIGHTS
from tuner.toy.batches import pixels_uint8, to_unit_range

EDIT_WEIGHTS = Path(__file__).parent / "weights" / "edit"
SEQUENCE_LENGTH = 32  # T5 tokens: the instructions are short (recipes set the same length)
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # the toy VAE's 4 latent channels, packed 2x2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=128,
    pooled_projection_dim=128,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_LR = 6000, 32, 1e-3
EDIT_STAGE = 5  # the batch stream's id inside the seed (the toy base uses 0-2)


def instruction(reference: world.Spec, rng: np.random.Generator) -> tuple[str, world.Spec]:
    """(instruction, target spec) for one reference of the base world."""
    u = rng.random()
    if u < 0.1:
        return "", reference
    if u < 0.25:
        return "keep it", reference
    if u < 0.5:
        colors = [c for c in world.COLORS if c not in (reference.color, reference.background)]
        color = colors[int(rng.integers(len(colors)))]
        return f"make it {color}", dataclasses.replace(reference, color=color)
    if u < 0.75:
        grounds = [b for b in world.BACKGROUNDS if b not in (reference.color, reference.background)]
        ground = grounds[int(rng.integers(len(grounds)))]
        text = f"put it on {world._article(ground)} background"
        return text, dataclasses.replace(reference, background=ground)
    shapes = [s for s in world.SHAPES if s != reference.shape]
    shape = shapes[int(rng.integers(len(shapes)))]
    return f"make it {world._article(shape)}", dataclasses.replace(reference, shape=shape)


def edit_batch(seed: int, step: int, size: int):
    """(reference pixels, target pixels, instructions) of batch `step`: a pure function."""
    rng = np.random.default_rng([seed, EDIT_STAGE, step])
    references = [world.sample_spec(rng) for _ in range(size)]
    pairs = [instruction(r, rng) for r in references]
    targets = [target for _, target in pairs]
    return pixels_uint8(references), pixels_uint8(targets), [text for text, _ in pairs]


def build_components(seed: int = 0) -> dict:
    """FluxKontextPipeline modules: fresh transformer and text encoders, the toy VAE."""
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(TOY_WEIGHTS / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # the Flux pipelines read a shift
    return {
        "transformer": FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        "vae": vae.eval().requires_grad_(False),
        "text_encoder": CLIPTextModel(clip_config(128, 2, 4)),
        "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": t5_encoder(128, 256, layers=2, heads=4, d_kv=32),
        "tokenizer_2": offline_t5_tokenizer(),
        "scheduler": flux_scheduler("dev"),
    }


def encode_text(modules: dict, texts: list[str], device) -> dict[str, torch.Tensor]:
    """As FluxPipeline.encode_prompt: CLIP's pooled output, T5's last hidden states."""
    clip_ids = modules["tokenizer"](
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    t5_ids = modules["tokenizer_2"](
        texts,
        padding="max_length",
        max_length=SEQUENCE_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    pooled = modules["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
    embeds = modules["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def flow_sigmas(gen: torch.Generator, n: int, device) -> torch.Tensor:
    """Logit-normal sigmas, shifted as the pipeline's schedule is at 64 image tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(64)
    sigma = torch.sigmoid(torch.randn(n, generator=gen, device=device))
    shift = float(np.exp(mu))
    return shift * sigma / (1 + (shift - 1) * sigma)


def train(modules: dict, steps: int, device, seed=0, batch_size=32, lr=1e-3, log_every=100):
    """Velocity loss on the target tokens, through the flux-kontext family's forward."""
    from tuner.families.flux_kontext import kontext_forward

    vae, transformer = modules["vae"].to(device), modules["transformer"].to(device).train()
    encoders = [modules["text_encoder"].to(device).train(), modules["text_encoder_2"].to(device)]
    encoders[1].train()
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = min(500, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * (1 - s / steps))
    )
    gen = torch.Generator(device).manual_seed(seed + 1)
    comps = SimpleNamespace(denoiser=transformer, dtype=torch.float32, guidance=None)
    scale = vae.config.scaling_factor
    start, total = time.time(), 0.0
    for step in range(steps):
        references, targets, texts = edit_batch(seed, step, batch_size)
        with torch.no_grad():
            reference = vae.encode(to_unit_range(references.to(device))).latent_dist.mode()
            target = vae.encode(to_unit_range(targets.to(device))).latent_dist.sample(gen)
            reference, target = reference * scale, target * scale
        noise = torch.randn(target.shape, generator=gen, device=device)
        sigma = flow_sigmas(gen, batch_size, device).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * target + sigma * noise
        cond = encode_text(modules, texts, device)
        pred = kontext_forward(comps, noisy, reference, sigma.flatten() * 1000, cond)
        loss = (pred.float() - (noise - target)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        total += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            seconds = (time.time() - start) / (step + 1)
            print(
                f"edit step {step + 1}/{steps} loss {total / log_every:.4f} ({seconds:.3f}s/step)",
                flush=True,
            )
            total = 0.0
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    for module in (transformer, *encoders):
        module.eval().requires_grad_(False)


def make_pipeline(modules: dict) -> FluxKontextPipeline:
    return FluxKontextPipeline(**modules)


def load_edit_modules() -> dict:
    """`builtin:toy-edit`: the committed toy editing base, as FluxKontextPipeline modules."""
    from tuner.errors import TunerError

    if not (EDIT_WEIGHTS / "model_index.json").is_file():
        raise TunerError(
            "builtin:toy-edit: the toy editing base's weights are not in this install; train "
            "them with `tuner toy train-edit-base --out tuner/toy/weights/edit`"
        )
    pipe = FluxKontextPipeline.from_pretrained(EDIT_WEIGHTS, torch_dtype=torch.float32)
    return dict(pipe.components)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="tuner toy train-edit-base")
    parser.add_argument("--out", default=str(EDIT_WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    modules = build_components(args.seed)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        count = sum(p.numel() for p in modules[name].parameters())
        print(f"{name}: {count / 1e6:.2f}M parameters")
    started = time.time()
    train(modules, args.steps, args.device, args.seed, args.batch_size, args.lr)
    pipe = make_pipeline(modules)
    pipe.to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out} after {(time.time() - started) / 60:.1f} min of training")


if __name__ == "__main__":
    main()
