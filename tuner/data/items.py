"""From recipe data entries to training batches.

collect_items: read every source, decode each image once (bad files are skipped with a warning),
               pick its bucket. Runs before any model is loaded, so data errors come first.
build_cache:   encode latents and prompts once into the on-disk cache (only the misses).
TrainDataset:  indexable by (item, epoch, position); all randomness is derived from those, so a
               resumed run sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tuner.data import masks
from tuner.data.buckets import (
    bucket_histogram,
    make_buckets,
    pick_bucket,
    resize_and_crop,
    square_size,
)
from tuner.data.captions import process_caption
from tuner.data.images import BadImage, load_image
from tuner.data.pairs import BadPair, Partner, prepare_partner, prepare_reference, read_partners
from tuner.data.sources import Record, list_records
from tuner.errors import TunerError

log = logging.getLogger("tuner")


@dataclass
class Item:
    """One distinct training image at its training size (repeats are expanded elsewhere)."""

    record: Record
    raw_caption: str
    size: tuple[int, int]  # (width, height) of its bucket
    image_hash: str
    prefix: str = ""
    suffix: str = ""
    role: str = "instance"  # "instance" or "class" (DreamBooth prior images)
    mask: str | None = None  # loss mask: a file path, masks.ALPHA, or None (no mask)
    mask_hash: str = ""  # content hash of the mask (part of the latent cache key)
    controls: tuple[Partner, ...] = ()  # reference images of an editing pair
    source_size: tuple[int, int] = (0, 0)  # (width, height) of the decoded target

    @property
    def caption(self) -> str:
        """The caption with prefix/suffix and no per-step randomness (what the cache holds)."""
        return process_caption(
            self.raw_caption, prefix=self.prefix, suffix=self.suffix, rng=random.Random(0)
        )


@dataclass
class DataReport:
    skipped: list[str] = field(default_factory=list)
    histogram: str = ""
    captions: list[str] = field(default_factory=list)


def collect_items(
    data, extra_sources=(), role_of_extra="instance", skip_dirs=None
) -> tuple[list[Item], DataReport]:
    """Items of every `data.datasets` entry (repeats expanded) plus `extra_sources`
    (pre-listed (entry, records) pairs, e.g. DreamBooth folders). skip_dirs: folders never
    read as training data (path -> what it is), e.g. the run's own output.dir."""
    report = DataReport()
    items: list[Item] = []
    sources = [(entry, None) for entry in data.datasets] + list(extra_sources)
    for index, (entry, records) in enumerate(sources):
        if records is None:
            mask_dir = masks.mask_dir_of(entry)
            if mask_dir and not os.path.isdir(os.path.expanduser(mask_dir)):
                raise TunerError(
                    f"{entry.path}: mask_dir {mask_dir} is not a folder; point it at the "
                    "folder of masks (same stems as the images)"
                )
            if mask_dir and os.path.realpath(mask_dir) == os.path.realpath(entry.path):
                raise TunerError(
                    f"{entry.path}: mask_dir is the dataset folder itself; put the masks in "
                    "their own folder"
                )
            if mask_dir:  # masks inside the dataset folder are not training images
                skip_dirs = {**(skip_dirs or {}), mask_dir: "the mask_dir"}
            records = list_records(
                entry.path,
                source=index,
                caption_ext=entry.caption_ext,
                caption_column=entry.caption_column,
                image_column=entry.image_column,
                split=entry.split,
                skip_dirs=skip_dirs,
                control_dir=getattr(entry, "control_dir", None),
                control_column=getattr(entry, "control_column", None),
            )
        role = "instance" if index < len(data.datasets) else role_of_extra
        usable = _items_of(records, entry, data, report, role)
        if not usable:
            if getattr(entry, "paired", False):
                raise TunerError(
                    f"{entry.path}: no usable (target, control) pair; each target needs a "
                    "readable control image (data.datasets[].control_dir: same file stem)"
                )
            raise TunerError(
                f"{entry.path}: no usable images (supported: jpg, png, webp, bmp); "
                "add images or fix data.datasets[].path"
            )
        uncaptioned = sum(1 for item in usable if not item.raw_caption.strip())
        if uncaptioned:
            log.warning(
                "%s: %d of %d images have no caption and no default_caption; they train "
                "as unconditional samples (set data.datasets[].default_caption or add "
                "%s files)",
                entry.path,
                uncaptioned,
                len(usable),
                entry.caption_ext,
            )
        items += usable * entry.repeats
    report.histogram = bucket_histogram([item.size for item in items])
    report.captions = [item.caption for item in items]
    return items, report


def data_fingerprint(items: list[Item]) -> dict:
    """What a checkpoint records of its data: a digest of every training image (content and
    caption, repeats included), so a resume can say when the data changed."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.role}\t{item.image_hash}\t{item.caption}\n".encode())
        for partner in item.controls:  # a changed reference is changed data too
            digest.update(f"control\t{partner.image_hash}\n".encode())
    return {"sha256": digest.hexdigest(), "images": len(items)}


def _items_of(records, entry, data, report: DataReport, role: str) -> list[Item]:
    resolution = entry.resolution or data.resolution
    options = data.bucket_options
    buckets = None
    if options:
        buckets = make_buckets(
            options.area or resolution * resolution,
            step=options.step,
            min_side=options.min_side,
            max_side=options.max_side,
            max_ratio=options.max_ratio,
        )
    items = []
    for record in records:
        try:
            raw = (
                record.image if isinstance(record.image, bytes) else Path(record.image).read_bytes()
            )
            width, height = load_image(raw).size
            mask, mask_hash = masks.find_mask(record, entry, data, raw, (width, height))
        except masks.BadMask as exc:
            name = record.image if isinstance(record.image, str) else record.key
            log.warning("skipping %s: %s", name, exc.reason)
            report.skipped.append(str(name))
            continue
        except (BadImage, OSError) as exc:
            name = record.image if isinstance(record.image, str) else record.key
            reason = exc.reason if isinstance(exc, BadImage) else type(exc).__name__
            log.warning("skipping %s: unreadable image (%s)", name, reason)
            report.skipped.append(str(name))
            continue
        try:
            controls = read_partners(record.controls)
        except BadPair as exc:
            name = record.image if isinstance(record.image, str) else record.key
            log.warning("skipping %s: %s", name, exc.reason)
            report.skipped.append(str(name))
            continue
        if buckets:
            size = pick_bucket(
                width, height, buckets, no_upscale=options.no_upscale, step=options.step
            )
        else:
            size = square_size(resolution)
        raw_caption = record.caption if record.caption else entry.default_caption
        items.append(
            Item(
                record,
                raw_caption,
                size,
                hashlib.sha256(raw).hexdigest(),
                prefix=entry.prefix,
                suffix=entry.suffix,
                role=role,
                mask=mask,
                mask_hash=mask_hash,
                controls=controls,
                source_size=(width, height),
            )
        )
    return items


def pixels_of(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> CHW float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare_controls(
    item: Item, crop: str, flip: bool, rng_state, reference_area: int = 0
) -> list[torch.Tensor]:
    """The item's reference images, aligned with its target: rng_state is the random state
    prepare_image's crop started from (None for a center crop). reference_area: the family's
    own reference size rule (FamilySpec.reference_area), 0 for the target's size and crop."""
    if reference_area:
        return [pixels_of(prepare_reference(p, reference_area, flip)) for p in item.controls]
    return [
        pixels_of(prepare_partner(p, item.source_size, item.size, crop, flip, rng_state))
        for p in item.controls
    ]


def prepare_image(item: Item, crop: str, flip: bool, rng: random.Random | None):
    """(pixels, crop_top_left, original_size, mask): the mask (1, H, W) in [0, 1], cropped and
    flipped as the image, or None when the item has none."""
    rng_state = rng.getstate() if rng is not None else None
    pixels, crop_top_left, original_size = _prepare_pixels(item, crop, flip, rng)
    mask = masks.prepare_mask(item, crop, flip, rng_state) if item.mask else None
    return pixels, crop_top_left, original_size, mask


def _prepare_pixels(item: Item, crop: str, flip: bool, rng: random.Random | None):
    image = load_image(item.record.image)
    image, crop_top_left, original_size = resize_and_crop(image, item.size, crop=crop, rng=rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # SDXL convention: the crop's left edge is mirrored with the image.
        orig_h, orig_w = original_size
        scale = max(item.size[0] / orig_w, item.size[1] / orig_h)
        resized_w = max(item.size[0], math.ceil(orig_w * scale - 1e-6))
        crop_top_left = (crop_top_left[0], resized_w - item.size[0] - crop_top_left[1])
    return pixels_of(image), crop_top_left, original_size
