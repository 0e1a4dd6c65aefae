"""The toy world's editing measure: does an editing LoRA apply its edit and keep the rest?

References are fresh base-world images (a solid shape in one colour on a background); each is
edited with the instruction at every adapter scale through FluxKontextPipeline (the adapter
loaded by diffusers' own load_lora_weights), and the judge reads the results:

- applied: the judge sees the wanted style (for "make it hollow": outline);
- kept: the judge sees the reference's shape, colour and background (all three);
- kept_shape / kept_color / kept_background: each on its own.

    tuner toy eval-edit --lora outputs/toy-hollow --scales 0 1 --n 32
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from tuner.toy import world
from tuner.toy.edit_base import SEQUENCE_LENGTH

EDIT_EVAL_SEED = 7_500_000  # its own stream: never a training reference (toy-hollow: 3003)
KEPT = ("shape", "color", "background")


def references(n: int, seed: int = EDIT_EVAL_SEED) -> list[world.Spec]:
    rng = np.random.default_rng(seed)
    return [world.sample_spec(rng) for _ in range(n)]


@torch.no_grad()
def render_edits(pipe, specs, instruction: str, scale: float, steps: int, batch: int = 16):
    """One edit per reference at this adapter scale; image i uses seed i."""
    from tuner.inference.render import lora_scale, pipeline_modules

    pipe.set_progress_bar_config(disable=True)
    images = []
    size = world.IMAGE_SIZE
    with lora_scale(pipeline_modules(pipe), scale):
        for start in range(0, len(specs), batch):
            chunk = specs[start : start + batch]
            images += pipe(
                image=[world.render(s) for s in chunk],
                prompt=[instruction] * len(chunk),
                width=size,
                height=size,
                max_area=size * size,
                _auto_resize=False,
                num_inference_steps=steps,
                max_sequence_length=SEQUENCE_LENGTH,
                generator=[torch.Generator().manual_seed(start + i) for i in range(len(chunk))],
            ).images
    return images


def judge_edits(judge, specs, images, style: str) -> dict[str, float]:
    seen = judge.predict(images)
    n = len(specs)
    out = {"applied": sum(s["style"] == style for s in seen) / n}
    out["kept"] = sum(all(s[k] == getattr(r, k) for k in KEPT) for s, r in zip(seen, specs)) / n
    for key in KEPT:
        out[f"kept_{key}"] = sum(s[key] == getattr(r, key) for s, r in zip(seen, specs)) / n
    return out


def edit_metrics(
    pipe,
    judge,
    *,
    instruction: str = "make it hollow",
    style: str = "outline",
    scales=(0.0, 1.0),
    n: int = 32,
    steps: int = 20,
    seed: int = EDIT_EVAL_SEED,
) -> dict[str, dict[str, float]]:
    """{scale: {applied, kept, kept_shape, kept_color, kept_background}}."""
    specs = references(n, seed)
    return {
        f"{scale:g}": judge_edits(
            judge, specs, render_edits(pipe, specs, instruction, scale, steps), style
        )
        for scale in scales
    }


def main(argv=None) -> None:
    from tuner.inference.pipelines import load_adapters, load_base, lora_specs
    from tuner.toy.judge import load_judge

    parser = argparse.ArgumentParser(prog="tuner toy eval-edit", description=__doc__)
    parser.add_argument("--lora", help="an adapter file or run folder (none: the base alone)")
    parser.add_argument("--model", default="builtin:toy-edit")
    parser.add_argument("--instruction", default="make it hollow")
    parser.add_argument("--style", default="outline", choices=world.STYLES)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    family, pipe = load_base(args.model)
    if args.lora:
        load_adapters(pipe, family, lora_specs([args.lora]))
    metrics = edit_metrics(
        pipe,
        load_judge(),
        instruction=args.instruction,
        style=args.style,
        scales=args.scales if args.lora else [0.0],
        n=args.n,
        steps=args.steps,
    )
    print(json.dumps(metrics, indent=1))
