"""The toy world: 64x64 images of simple shapes whose ground truth is known.

Everything is a pure function of a seed, so datasets, judge training data and base-model
training data can be regenerated bit for bit.

Base world (what the toy base model is trained on): one solid shape (circle, square,
triangle, star, cross) in a named colour on a plain background of another named colour,
captioned "a red circle on a blue background" ("an" before a vowel).

Held out from the base world, so adapters have something new to learn:

* Styles: "stripes" (diagonal stripes of shape and background colour), "outline" (a 3 px
  outline only), "dots" (background-coloured polka dots punched into the shape) change how
  the shape is filled. Their captions end with a made-up trigger word (STYLE_TRIGGERS),
  e.g. "a red circle on a blue background, zebrastyle".
* Subjects: composite objects that *belong to a base-world class*, so DreamBooth prior
  preservation makes sense. "smiley" is a yellow circle with a black face (instance prompt
  "a sks circle on a blue background", class prompt "a circle on a blue background");
  "robot" is a blue square head with white eyes, mouth and an antenna ("an ohwx square ...").
  A subject's colour is fixed (part of its identity), so its caption names no colour.

CLI: `python -m tuner.toy.world render-datasets datasets/` writes the style sets
datasets/toy-outline and datasets/toy-stripes and the subject set datasets/toy-subject,
deterministically (see tuner.toy.datasets).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = ("white", "black", "blue", "green", "yellow")
STYLES = ("solid", "stripes", "outline", "dots")
STYLE_TRIGGERS = {"stripes": "zebrastyle", "outline": "hollowstyle", "dots": "pokastyle"}


@dataclass(frozen=True)
class Subject:
    token: str  # rare word used in instance prompts
    shape: str  # the base-world class it belongs to (class prompt noun)
    color: str  # fixed body colour


SUBJECTS = {
    "smiley": Subject(token="sks", shape="circle", color="yellow"),
    "robot": Subject(token="ohwx", shape="square", color="blue"),
}
SUBJECT_NAMES = ("none", *SUBJECTS)

# Every word a caption can contain; the toy tokenizer gives each a single id.
VOCABULARY = (
    "a", "an", "on", "background", "in", "of", "the", "photo", "style", "shape",
    *SHAPES, *COLORS, *STYLE_TRIGGERS.values(), *(s.token for s in SUBJECTS.values()),
)  # fmt: skip

SIZE_RANGE = (22, 44)
SUBJECT_SIZE_RANGE = (32, 44)  # faces need room to stay readable


@dataclass(frozen=True)
class Spec:
    shape: str
    color: str
    background: str
    style: str = "solid"
    subject: str = "none"
    size: int = 32
    cx: int = 32
    cy: int = 32


def _pick(rng: np.random.Generator, allowed: str | Iterable[str] | None, universe) -> str:
    """Pick uniformly from `allowed` (one value, several, or None meaning `universe`)."""
    if allowed is None:
        options = list(universe)
    elif isinstance(allowed, str):
        options = [allowed]
    else:
        options = list(allowed)
    if not options:
        raise ValueError("no value left to choose from")
    return options[int(rng.integers(len(options)))]


def sample_spec(
    rng: np.random.Generator,
    shape=None,
    color=None,
    background=None,
    style="solid",
    subject="none",
) -> Spec:
    """Draw a random spec. Each constraint is a value, a collection of values, or None (any).

    Defaults give the base world: solid style, no subject."""
    subj = _pick(rng, subject, SUBJECT_NAMES)
    sty = _pick(rng, style, STYLES)
    if subj != "none":
        shp, col = SUBJECTS[subj].shape, SUBJECTS[subj].color
        lo, hi = SUBJECT_SIZE_RANGE
    else:
        shp = _pick(rng, shape, SHAPES)
        col = _pick(rng, color, COLORS)
        lo, hi = SIZE_RANGE
    backgrounds = [
        b
        for b in (
            BACKGROUNDS
            if background is None
            else [background]
            if isinstance(background, str)
            else background
        )
        if b != col
    ]
    bg = _pick(rng, backgrounds, BACKGROUNDS)
    size = int(rng.integers(lo, hi + 1))
    half = (size + 1) // 2 + 2  # a margin of a pixel or more: the shape is fully inside
    cx = int(rng.integers(half, IMAGE_SIZE - half + 1))
    cy = int(rng.integers(half, IMAGE_SIZE - half + 1))
    return Spec(shp, col, bg, sty, subj, size, cx, cy)


def mixed_spec(rng: np.random.Generator) -> Spec:
    """The whole world, styles and subjects included (for the judge and the VAE)."""
    style = "solid" if rng.random() < 0.4 else _pick(rng, STYLES[1:], STYLES)
    subject = "none" if rng.random() < 0.6 else _pick(rng, SUBJECT_NAMES[1:], SUBJECT_NAMES)
    return sample_spec(rng, style=style, subject=subject)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(spec: Spec, with_color: bool = True, with_background: bool = True) -> str:
    """'a red circle on a blue background[, zebrastyle]'; subjects use their token instead
    of a colour. Dropping parts gives class-level prompts like 'a circle'."""
    if spec.subject != "none":
        text = _article(f"{SUBJECTS[spec.subject].token} {spec.shape}")
    elif with_color:
        text = _article(f"{spec.color} {spec.shape}")
    else:
        text = _article(spec.shape)
    if with_background:
        text += f" on {_article(spec.background)} background"
    if spec.style != "solid":
        text += f", {STYLE_TRIGGERS[spec.style]}"
    return text


def _shape_mask(shape: str, cx: int, cy: int, size: int) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    elif shape == "square":
        s = r * 0.9  # a square of equal extent looks much heavier than the other shapes
        draw.rectangle([cx - s, cy - s, cx + s - 1, cy + s - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=255)
    elif shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    elif shape == "cross":
        w = size / 5  # arm half-width; wide enough to survive the outline style
        draw.rectangle([cx - w, cy - r, cx + w - 1, cy + r - 1], fill=255)
        draw.rectangle([cx - r, cy - w, cx + r - 1, cy + w - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _style_pattern(style: str, mask: Image.Image) -> np.ndarray:
    """Boolean array: which pixels of the shape get the shape colour."""
    inside = np.asarray(mask) > 127
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if style == "solid":
        return inside
    if style == "stripes":
        return inside & (((xx + yy) // 4) % 2 == 0)  # 45-degree stripes, 8 px period
    if style == "outline":
        interior = np.asarray(mask.filter(ImageFilter.MinFilter(7))) > 127  # erode 3 px
        return inside & ~interior
    if style == "dots":
        # Background-coloured polka dots punched into the shape: the silhouette stays
        # readable. Staggered rows, else the dots read as a grid.
        shift = 3 * ((yy // 7) % 2)
        dx, dy = (xx + shift) % 7 - 3, yy % 7 - 3
        return inside & (dx * dx + dy * dy > 4)
    raise ValueError(f"unknown style {style!r}")


def _draw_subject_details(draw: ImageDraw.ImageDraw, spec: Spec) -> None:
    """Features drawn over the styled body; they never take the style so identity stays."""
    s, cx, cy = spec.size, spec.cx, spec.cy
    if spec.subject == "smiley":
        black = COLORS["black"]
        e = s * 0.09
        for ex in (cx - s * 0.2, cx + s * 0.2):
            draw.ellipse([ex - e, cy - s * 0.14 - e, ex + e, cy - s * 0.14 + e], fill=black)
        draw.rectangle([cx - s * 0.22, cy + s * 0.14, cx + s * 0.22, cy + s * 0.22], fill=black)
    elif spec.subject == "robot":
        white = COLORS["white"]
        e = s * 0.1
        for ex in (cx - s * 0.2, cx + s * 0.2):
            draw.rectangle([ex - e, cy - s * 0.05 - e, ex + e, cy - s * 0.05 + e], fill=white)
        draw.rectangle([cx - s * 0.22, cy + s * 0.2, cx + s * 0.22, cy + s * 0.26], fill=white)


def _subject_body_mask(spec: Spec) -> Image.Image:
    if spec.subject == "robot":
        # Head sits low in the box so the antenna (same colour) fits above it.
        s, cx, cy = spec.size, spec.cx, spec.cy
        mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw = ImageDraw.Draw(mask)
        h = s * 0.36
        top = cy - s * 0.25
        draw.rectangle([cx - h, top, cx + h - 1, cy + s * 0.47], fill=255)
        draw.rectangle([cx - 1, cy - s / 2 + 3, cx + 1, top], fill=255)  # antenna rod
        draw.ellipse([cx - 3, cy - s / 2, cx + 3, cy - s / 2 + 6], fill=255)  # antenna ball
        return mask
    return _shape_mask(spec.shape, spec.cx, spec.cy, spec.size)


def subject_mask(spec: Spec, margin: int = 3) -> Image.Image:
    """Where the subject is (white), grown by `margin` pixels: a loss mask around the subject
    (the edge pixels mix subject and background in the VAE's latent)."""
    if spec.subject != "none":
        mask = _subject_body_mask(spec)
    else:
        mask = _shape_mask(spec.shape, spec.cx, spec.cy, spec.size)
    return mask.filter(ImageFilter.MaxFilter(2 * margin + 1)) if margin else mask


def render(spec: Spec) -> Image.Image:
    """Draw one spec as a 64x64 RGB image."""
    if spec.subject != "none":
        mask = _subject_body_mask(spec)
    else:
        mask = _shape_mask(spec.shape, spec.cx, spec.cy, spec.size)
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = COLORS[spec.background]
    pixels[_style_pattern(spec.style, mask)] = COLORS[spec.color]
    image = Image.fromarray(pixels, "RGB")
    if spec.subject != "none":
        _draw_subject_details(ImageDraw.Draw(image), spec)
    return image


def generate(seed: int, n: int, **constraints) -> list[tuple[Image.Image, Spec]]:
    """n (image, spec) pairs from one seed; constraints as for `sample_spec`."""
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, **constraints) for _ in range(n)]
    return [(render(spec), spec) for spec in specs]


def grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    """Paste 64x64 images into one contact sheet, row by row."""
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, rows * IMAGE_SIZE), "gray")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * IMAGE_SIZE, (i // columns) * IMAGE_SIZE))
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tuner.toy.world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "render-datasets", help="write datasets/toy-outline, toy-stripes and toy-subject"
    )
    p.add_argument("root", help="folder that receives the dataset folders, e.g. datasets/")
    p = sub.add_parser("preview", help="write a grid of random world images")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed", action="store_true", help="include styles and subjects")
    args = parser.parse_args(argv)
    if args.command == "render-datasets":
        from tuner.toy.datasets import render_datasets  # it imports this module

        for folder in render_datasets(args.root):
            print(f"wrote {folder}")
    elif args.command == "preview":
        rng = np.random.default_rng(args.seed)
        specs = [mixed_spec(rng) if args.mixed else sample_spec(rng) for _ in range(64)]
        grid([render(spec) for spec in specs]).save(args.out)
        for i, spec in enumerate(specs[:8]):
            print(i, caption(spec))


if __name__ == "__main__":
    main()
