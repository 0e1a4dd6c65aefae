"""Score a toy pipeline (base model, or base + adapter) with the judge.

Each spec's caption is the prompt; the judge reads each sample back and we count how often
each head matches the spec. For a style adapter, pass specs with that style (their captions
carry the trigger word) and watch the "style" head; for a subject adapter, specs with that
subject and the "subject" head.

    python -m tuner.toy.score --model tuner/toy/weights/base --n 64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from tuner.toy import world
from tuner.toy.judge import HEADS, load_judge, spec_labels


def score_pipeline(
    pipe, specs=None, n=64, seed=0, steps=25, guidance=4.0, judge=None, batch_size=64
) -> dict:
    """-> {"accuracy": {head: fraction}, "all": fraction with every head right,
    "images": [...], "predictions": [...], "specs": [...], "summary": str}"""
    from tuner.toy.base import sample_images

    if specs is None:
        rng = np.random.default_rng([seed, 99])
        specs = [world.sample_spec(rng) for _ in range(n)]
    judge = judge or load_judge()
    images = []
    for i in range(0, len(specs), batch_size):
        prompts = [world.caption(s) for s in specs[i : i + batch_size]]
        images += sample_images(pipe, prompts, seed=seed + i, steps=steps, guidance=guidance)
    predictions = judge.predict(images)
    truth = [spec_labels(s) for s in specs]
    accuracy = {
        h: float(np.mean([p[h] == t[h] for p, t in zip(predictions, truth, strict=True)]))
        for h in HEADS
    }
    every = float(
        np.mean([all(p[h] == t[h] for h in HEADS) for p, t in zip(predictions, truth, strict=True)])
    )
    summary = " ".join(f"{h} {a:.0%}" for h, a in accuracy.items()) + f" | all {every:.0%}"
    return {
        "accuracy": accuracy,
        "all": every,
        "images": images,
        "predictions": predictions,
        "specs": specs,
        "summary": summary,
    }


def main(argv=None) -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(prog="python -m tuner.toy.score")
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", default="solid", choices=world.STYLES)
    parser.add_argument("--subject", default="none", choices=world.SUBJECT_NAMES)
    parser.add_argument("--grid", help="also save the samples as a grid PNG")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.to(args.device)
    rng = np.random.default_rng([args.seed, 99])
    specs = [world.sample_spec(rng, style=args.style, subject=args.subject) for _ in range(args.n)]
    result = score_pipeline(pipe, specs, seed=args.seed)
    if args.grid:
        world.grid(result["images"]).save(args.grid)
    print(result["summary"])


if __name__ == "__main__":
    main()
