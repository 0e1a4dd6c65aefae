"""The toy base model (`builtin:toy`): a tiny Stable-Diffusion pipeline that draws the world.

Same component classes as SD 1.x, only small: AutoencoderKL (64x64x3 <-> 16x16x4),
CLIPTextModel over the offline toy tokenizer, UNet2DConditionModel, DDPMScheduler. So
every SD code path (LoRA on attention layers, DreamBooth, text-encoder training) runs on it.

Training is two stages, reproducible from --seed on one device:
1. the VAE, on the whole world (styles and subjects too: it is the image codec, and an
   adapter can only learn a style the codec can reproduce);
2. UNet + text encoder jointly, on the base world only (solid shapes, no subjects), with
   10% empty captions for classifier-free guidance and some captions that omit the colour
   or the background, so class prompts such as "a circle on a blue background" mean
   something to the model.

    tuner toy train-base --out tuner/toy/weights/base --seed 0     # python -m tuner.toy.base train
    tuner toy sample --model tuner/toy/weights/base \
        --prompt "a red circle on a blue background" --out x.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from tuner.toy import world
from tuner.toy.base_training import train_unet, train_vae
from tuner.toy.tokenizer import MAX_LENGTH, build_tokenizer

LATENT_SIZE = 16
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=world.IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=128,
)
# No attention at 16x16 and 4 heads elsewhere: on a CPU, 16x16 self-attention with tiny heads
# cost more than half of each step (measured 0.40 -> 0.17 s at batch 32) for little gain on
# flat shapes; text still steers every block through the 8x8 and 4x4 cross-attention.
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    norm_num_groups=16,
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
)
# Linear DDPM betas reach ~zero terminal SNR, which small images need more than SD's schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)
# Sized for a 2-core CPU in under an hour (measured on this project's CI-class machine:
# VAE 0.25 s/step, UNet + text encoder 0.22 s/step, both at batch 32: 42.8 min in all).
DEFAULT_VAE_STEPS, DEFAULT_VAE_BATCH, DEFAULT_VAE_LR = 1500, 32, 3e-3
DEFAULT_UNET_STEPS, DEFAULT_BATCH, DEFAULT_LR = 10000, 32, 1e-3


def build_components(seed: int = 0):
    """Freshly initialised (vae, text_encoder, tokenizer, unet, scheduler)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_CONFIG,
        )
    )
    return (
        AutoencoderKL(**VAE_CONFIG),
        text_encoder,
        tokenizer,
        UNet2DConditionModel(**UNET_CONFIG),
        DDPMScheduler(**SCHEDULER_CONFIG),
    )


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, out) -> int:
    """save_pretrained with fp16 UNet and VAE; returns the bytes written (previews aside)."""
    # fp16 UNet and VAE keep the folder commit-sized; diffusers loads them back as fp32
    # unless asked otherwise. transformers keeps the saved dtype, so the small text
    # encoder stays fp32 and a plain from_pretrained gives one consistent dtype.
    pipe.to("cpu")
    for module in (pipe.unet, pipe.vae):
        torch.nn.Module.half(module)  # the plain cast: diffusers' .to() warns about it
    pipe.save_pretrained(out, safe_serialization=True)
    for module in (pipe.unet, pipe.vae):
        torch.nn.Module.float(module)
    return sum(
        f.stat().st_size for f in Path(out).rglob("*") if f.is_file() and "previews" not in f.parts
    )


TOY_WEIGHTS = Path(__file__).parent / "weights" / "base"


def load_toy_modules() -> dict:
    """`builtin:toy`: the committed toy base model, as StableDiffusionPipeline modules."""
    from tuner.errors import TunerError

    folder = TOY_WEIGHTS
    if not (folder / "model_index.json").is_file():
        raise TunerError(
            "builtin:toy: the toy base model's weights are not in this install; train them with "
            "`tuner toy train-base --out tuner/toy/weights/base` (under an hour on a 2-core "
            "CPU, minutes on a GPU), or use builtin:tiny-sd15"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    return {name: getattr(pipe, name) for name in names}


def builtins() -> dict:
    """`builtin:toy` and `builtin:toy-edit`, registered through the `tuner.builtins` entry
    point."""
    from tuner.builtins import Builtin
    from tuner.toy.edit_base import load_edit_modules

    return {
        "toy": Builtin("sd15", load_toy_modules),
        "toy-edit": Builtin("flux-kontext", load_edit_modules),
    }


def sample_images(pipe, prompts, seed=0, steps=25, guidance=4.0):
    """64x64 samples with a DDIM copy of the scheduler (DDPM needs ~1000 steps)."""
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    runner = StableDiffusionPipeline(
        **{**pipe.components, "scheduler": ddim}, requires_safety_checker=False
    )
    runner.set_progress_bar_config(disable=True)
    device = pipe.unet.device
    gen = torch.Generator(device).manual_seed(seed)
    return runner(
        list(prompts),
        height=world.IMAGE_SIZE,
        width=world.IMAGE_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gen,
    ).images


def train(args) -> None:
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick conv kernels
    vae, text_encoder, tokenizer, unet, scheduler = build_components(args.seed)
    for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
    out = Path(args.out)
    train_vae(
        vae,
        args.vae_steps,
        args.device,
        seed=args.seed,
        batch_size=args.vae_batch_size,
        lr=args.vae_lr,
        workers=args.workers,
    )
    # Shipped with DDIM as its sampler (20-50 steps draw well); training reads DDPM from the
    # same config, as SD 1.5 ships PNDM and trains DDPM.
    sampler = DDIMScheduler.from_config(scheduler.config)
    pipe = make_pipeline(vae, text_encoder, tokenizer, unet, sampler)

    def preview(step: int) -> None:
        from tuner.toy.score import score_pipeline

        result = score_pipeline(pipe, n=args.preview_n, seed=args.seed)
        world.grid(result["images"][:32]).save(out / "previews" / f"step{step:06d}.png")
        print(f"preview step {step}: " + result["summary"], flush=True)

    if args.preview_every:
        (out / "previews").mkdir(parents=True, exist_ok=True)  # delete before committing
    train_unet(
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        args.unet_steps,
        args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        preview_every=args.preview_every,
        preview=preview,
        workers=args.workers,
        time_limit=args.unet_minutes,
    )
    size = save_pipeline(pipe, out)
    print(f"saved {out} ({size / 1e6:.1f} MB)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tuner.toy.base")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the toy base model from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-steps", type=int, default=DEFAULT_VAE_STEPS)
    p.add_argument("--unet-steps", type=int, default=DEFAULT_UNET_STEPS)
    p.add_argument("--vae-batch-size", type=int, default=DEFAULT_VAE_BATCH)
    p.add_argument("--vae-lr", type=float, default=DEFAULT_VAE_LR)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument(
        "--preview-every",
        type=int,
        default=0,
        help="every N UNet steps, sample and score with the judge (0: never)",
    )
    p.add_argument("--preview-n", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument(
        "--workers",
        type=int,
        default=8 if torch.cuda.is_available() else 0,
        help="processes rendering batches (results do not depend on it)",
    )
    p.add_argument(
        "--unet-minutes",
        type=float,
        default=0,
        help="stop UNet training after this many minutes (0: never)",
    )
    p = sub.add_parser("sample", help="draw prompts with a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1, help="images (a grid when > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
        pipe.to(args.device)
        images = sample_images(
            pipe, [args.prompt] * args.n, seed=args.seed, steps=args.steps, guidance=args.guidance
        )
        (images[0] if args.n == 1 else world.grid(images)).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
