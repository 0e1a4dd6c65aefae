"""Partner files of training images: the reference (control) images of editing datasets.

A partner is found by stem in a partner folder (`targets/001.png` <-> `controls/001.jpg`), or
named by a column of a metadata file / HF dataset (one image or a list of them). A pair whose
partner is missing or unreadable is skipped and named, like any other bad image. Prepared
controls go through the same resize, crop and flip as their target, so the pair stays aligned.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tuner.data.buckets import resize_and_crop
from tuner.data.images import IMAGE_EXTS, BadImage, load_image


class BadPair(Exception):
    """A target whose partner is missing or unreadable (the caller skips and names it)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Partner:
    """One decoded-once partner image: where it came from and the hash of its bytes."""

    image: str | bytes
    image_hash: str
    size: tuple[int, int] = (0, 0)  # (width, height) as decoded


MISSING = "missing"  # a Record.controls entry for a partner file that does not exist


def partner_in(folder: str, image_path: str, root: str) -> str:
    """The file in `folder` with the same relative stem as `image_path` under `root`
    (any supported image extension), or MISSING."""
    relative = os.path.splitext(os.path.relpath(image_path, root))[0]
    stem = os.path.join(folder, relative)
    for ext in IMAGE_EXTS + tuple(e.upper() for e in IMAGE_EXTS):
        if os.path.isfile(stem + ext):
            return stem + ext
    return MISSING


def column_partners(value, root: str) -> tuple:
    """A control-column cell (a file name, an image cell, or a list of them) -> partners;
    file names are relative to the dataset folder."""
    cells = value if isinstance(value, (list, tuple)) else [value]
    found = []
    for cell in cells:
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            found.append(bytes(cell))
            continue
        if hasattr(cell, "save"):  # a decoded PIL image
            import io

            buffer = io.BytesIO()
            cell.save(buffer, format="PNG")
            found.append(buffer.getvalue())
            continue
        if not cell:
            found.append(MISSING)
            continue
        path = cell if os.path.isabs(cell) else os.path.join(root, cell)
        found.append(path if os.path.isfile(path) else MISSING)
    return tuple(found)


def read_partners(controls: tuple) -> tuple[Partner, ...]:
    """Decode each partner once (so a bad one is found before any model loads)."""
    partners = []
    for control in controls:
        if control == MISSING:
            raise BadPair("no control image")
        try:
            raw = control if isinstance(control, bytes) else Path(control).read_bytes()
            size = load_image(raw).size
        except (BadImage, OSError) as exc:
            reason = exc.reason if isinstance(exc, BadImage) else type(exc).__name__
            raise BadPair(f"unreadable control image {_name(control)} ({reason})") from exc
        partners.append(Partner(control, hashlib.sha256(raw).hexdigest(), size))
    return tuple(partners)


def prepare_partner(
    partner: Partner,
    target_size: tuple[int, int],
    size: tuple[int, int],
    crop: str,
    flip: bool,
    rng_state,
) -> Image.Image:
    """The partner at its target's training size: first resized to the target's own size
    (width, height), so the same crop window covers the same content, then cropped with the
    random state the target's crop started from, then flipped like the target."""
    image = load_image(partner.image)
    if image.size != target_size:
        image = image.resize(target_size, Image.Resampling.BICUBIC)
    rng = None
    if rng_state is not None:
        rng = random.Random()
        rng.setstate(rng_state)
    image, _, _ = resize_and_crop(image, size, crop=crop, rng=rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def reference_size(area: int, size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of about `area` pixels with the aspect ratio of `size`, each a multiple
    of 32: the rule QwenImageEdit(Plus)Pipeline applies to every reference image."""
    ratio = size[0] / size[1]
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def partner_image(partner: Partner, flip: bool) -> Image.Image:
    """The whole reference, flipped with its target: what a prompt encoder that reads the
    reference sees (the family resizes it by its pipeline's rule)."""
    image = load_image(partner.image)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def prepare_reference(partner: Partner, area: int, flip: bool) -> Image.Image:
    """The whole reference (no crop) resized to `area` pixels at its own aspect ratio with
    Lanczos, as the pipeline's image processor resizes it, then flipped like its target."""
    image = load_image(partner.image)
    image = image.resize(reference_size(area, image.size), Image.Resampling.LANCZOS)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def _name(control) -> str:
    return control if isinstance(control, str) else "<embedded image>"
