"""The judge: a small CNN that reads a toy-world image back into its spec.

Heads: shape (a subject reports its class shape), color (shape/body colour), background,
style and subject. Trained only on generator images, with mild noise and blur so that it
also reads the softer images a diffusion model draws. Used to score adapters offline:
sample from a model, ask the judge what it sees, compare with the prompt.

    python -m tuner.toy.judge train --out tuner/toy/weights/judge.safetensors --steps 2000
    python -m tuner.toy.judge eval
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from tuner.toy import world

HEADS = {
    "shape": world.SHAPES,
    "color": tuple(world.COLORS),
    "background": world.BACKGROUNDS,
    "style": world.STYLES,
    "subject": world.SUBJECT_NAMES,
}
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "judge.safetensors"
EVAL_SEED = 7_000_000  # eval streams never collide with training streams ([seed, step])


def spec_labels(spec: world.Spec) -> dict[str, str]:
    """What the judge should answer for a spec."""
    return {
        "shape": spec.shape,
        "color": spec.color,
        "background": spec.background,
        "style": spec.style,
        "subject": spec.subject,
    }


class JudgeNet(nn.Module):
    """Five 3x3 conv layers (64 -> 4 px), avg+max pooled, one linear layer per head.

    Max pooling lets a single local cue (a star tip, a face's eye) decide a head."""

    def __init__(self, widths=(16, 32, 64, 128, 128)):
        super().__init__()
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * cin, len(labels)) for name, labels in HEADS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], resized to the world's size if needed."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            img = img.resize((world.IMAGE_SIZE, world.IMAGE_SIZE), Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    specs = [world.mixed_spec(rng) for _ in range(n)]
    x = images_to_tensor([world.render(s) for s in specs])
    y = {
        head: torch.tensor([labels.index(spec_labels(s)[head]) for s in specs])
        for head, labels in HEADS.items()
    }
    return x, y


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur some images and add noise to all: diffusion samples are never pixel-crisp."""
    n = x.shape[0]
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        kernel = torch.full((3, 1, 3, 3), 1 / 9)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    return x + sigma * torch.randn(x.shape, generator=gen)


def train(
    out: str | os.PathLike,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    log_every: int = 100,
) -> JudgeNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    params = sum(p.numel() for p in net.parameters())
    print(f"judge: {params} parameters, {steps} steps of batch {batch_size}")
    start = time.time()
    net.train()
    for step in range(steps):
        x, y = _batch(np.random.default_rng([seed, step]), batch_size)
        logits = net(_augment(x, gen))
        loss = sum(F.cross_entropy(logits[h], y[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(
                f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
    net.eval()
    save(net, out)
    print(f"saved {out} after {time.time() - start:.0f}s")
    return net


def save(net: JudgeNet, out: str | os.PathLike) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    with open(out.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump(
            {"heads": {h: list(v) for h, v in HEADS.items()}, "image_size": world.IMAGE_SIZE},
            f,
            indent=1,
        )
        f.write("\n")


class Judge:
    """Loaded judge: `predict(images)` -> one {head: label} dict per image."""

    def __init__(self, net: JudgeNet, heads: dict[str, list[str]]):
        self.net = net.eval()
        self.heads = heads

    @torch.no_grad()
    def predict(self, images: list[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
        results: list[dict[str, str]] = []
        for i in range(0, len(images), batch_size):
            logits = self.net(images_to_tensor(images[i : i + batch_size]))
            picks = {h: logits[h].argmax(dim=1).tolist() for h in self.heads}
            for j in range(len(picks["shape"])):
                results.append({h: self.heads[h][picks[h][j]] for h in self.heads})
        return results


def load_judge(path: str | os.PathLike | None = None) -> Judge:
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no judge weights; train them with `python -m tuner.toy.judge train`"
        )
    with open(path.with_suffix(".json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta["heads"] != {h: list(v) for h, v in HEADS.items()}:
        raise ValueError(f"{path}: label names differ from this world; retrain the judge")
    net = JudgeNet()
    net.load_state_dict(load_file(str(path)))
    return Judge(net, meta["heads"])


def evaluate(judge: Judge, n: int = 1000, seed: int = EVAL_SEED) -> dict[str, float]:
    """Per-head accuracy on n fresh mixed-world images (styles and subjects included)."""
    rng = np.random.default_rng(seed)
    specs = [world.mixed_spec(rng) for _ in range(n)]
    preds = judge.predict([world.render(s) for s in specs])
    truth = [spec_labels(s) for s in specs]
    return {
        h: float(np.mean([p[h] == t[h] for p, t in zip(preds, truth, strict=True)])) for h in HEADS
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tuner.toy.judge")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the judge on generator images")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the box is shared)")
    p = sub.add_parser("eval", help="per-head accuracy on fresh generator images")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.command == "train":
        train(args.out, args.steps, seed=args.seed, batch_size=args.batch_size)
    else:
        start = time.time()
        accuracy = evaluate(load_judge(args.weights), n=args.n, seed=args.seed)
        for head, acc in accuracy.items():
            print(f"{head:<10} {acc:.2%}")
        print(f"({args.n} images, {time.time() - start:.1f}s)")


if __name__ == "__main__":
    main()
