"""Aspect-ratio bucketing: a fixed set of (width, height) training sizes of roughly
equal area, so images keep their framing instead of being center-cropped square."""

from __future__ import annotations

import math
import random
from collections import Counter

from PIL import Image


def make_buckets(
    area: int,
    *,
    step: int = 64,
    min_side: int = 256,
    max_side: int = 2048,
    max_ratio: float = 2.0,
) -> list[tuple[int, int]]:
    """All (width, height) with sides multiples of `step`, w*h <= area, and aspect
    ratio within `max_ratio`; for each width the tallest height that fits, plus the
    transpose of each such bucket.

    If `min_side` exceeds the square side for `area` (small toy resolutions), it is
    lowered to that side so there is always at least the square bucket."""
    if area < step * step:
        raise ValueError(f"bucket area {area} is smaller than one {step}x{step} step")
    side = math.isqrt(area) // step * step
    lo = min(_ceil_to(max(min_side, step), step), side)
    hi = max_side - max_side % step
    buckets: set[tuple[int, int]] = set()
    for width in range(lo, hi + 1, step):
        height = min(hi, (area // width) // step * step)
        if height < lo:
            break  # wider only gets shorter
        if max(width / height, height / width) <= max_ratio + 1e-9:
            buckets.add((width, height))
    if side <= hi:
        # The largest-height-per-width rule already yields the square when area is a
        # perfect step multiple; this covers the other cases explicitly.
        buckets.add((side, side))
    # Height rounding makes the scan lopsided (e.g. 1408x704 fits 2:1 but 704x1472
    # breaks it), so mirror every bucket: portrait and landscape get the same choices.
    buckets |= {(h, w) for w, h in buckets}
    if not buckets:
        raise ValueError(f"no buckets for area={area} step={step} sides {min_side}..{max_side}")
    return sorted(buckets)


def _ceil_to(value: int, step: int) -> int:
    return -(-value // step) * step


def pick_bucket(
    width: int,
    height: int,
    buckets: list[tuple[int, int]],
    *,
    no_upscale: bool = False,
    step: int = 64,
) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to the image's.

    With `no_upscale`, an image that the chosen bucket would enlarge (smaller than it
    in area, or in either side) gets a bucket from its own size instead: sides floored
    to a multiple of `step` (at least one step), after first shrinking the image
    size to the chosen bucket's area if it is larger (extreme aspect ratios), so the
    area budget holds. Such ad-hoc buckets are not in `buckets`; the sampler groups by
    size, so they form their own (usually small) groups. Pass the `step` the buckets
    were made with."""
    if not buckets:
        raise ValueError("pick_bucket needs at least one bucket")
    target = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))
    if no_upscale and (best[0] > width or best[1] > height):
        return _own_bucket(width, height, best[0] * best[1], step)
    return best


def _own_bucket(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    # Never scale up; scale down only to respect the area budget. Flooring each side
    # then keeps the aspect close and the cover-resize scale <= 1.
    scale = min(1.0, math.sqrt(area / (width * height)))
    w, h = math.floor(width * scale), math.floor(height * scale)
    return max(step, w // step * step), max(step, h // step * step)


def square_size(resolution: int) -> tuple[int, int]:
    """Bucketing disabled: every image trains at resolution x resolution."""
    return resolution, resolution


def resize_and_crop(
    img: Image.Image,
    size: tuple[int, int],
    *,
    crop: str = "center",
    rng: random.Random | None = None,
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize `img` to cover `size` (width, height), then crop to it.

    Returns (image, crop_top_left, original_size) with crop_top_left = (top, left) in
    the resized image's pixels and original_size = (height, width) of the input: the
    SDXL micro-conditioning convention."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    target_w, target_h = size
    src_w, src_h = img.size
    original_size = (src_h, src_w)

    scale = max(target_w / src_w, target_h / src_h)
    # Round up so float error never leaves the cover 1px short of the target.
    new_w = max(target_w, math.ceil(src_w * scale - 1e-6))
    new_h = max(target_h, math.ceil(src_h * scale - 1e-6))
    if (new_w, new_h) != (src_w, src_h):
        # LANCZOS for downscaling (sharp, little aliasing); BICUBIC when enlarging.
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), method)

    spare_w, spare_h = new_w - target_w, new_h - target_h
    if crop == "random":
        if rng is None:
            raise ValueError("random crop needs an rng (seeded, for reproducibility)")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    if spare_w or spare_h:
        img = img.crop((left, top, left + target_w, top + target_h))
    return img, (top, left), original_size


def bucket_histogram(assignments: list[tuple[int, int]]) -> str:
    """One line per bucket, most-used first: '  512x768: 12 images'."""
    counts = Counter(assignments)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = []
    for (w, h), n in ordered:
        noun = "image" if n == 1 else "images"
        lines.append(f"  {w}x{h}: {n} {noun}")
    return "\n".join(lines)
