"""Loss masks: one grayscale mask per training image (white = train, black = not), from a
`mask_dir` of same-stem files or from the image's alpha channel (`data.alpha_mask`).

A mask is resized and cropped exactly as its image (same cover size, same crop offsets, same
flip), then area-averaged onto the latent grid, where it weights the loss (see
tuner/objectives/masks.py). Masks that cannot be used are named and their image skipped, as
unreadable images are.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from tuner.data.buckets import resize_and_crop
from tuner.data.images import IMAGE_EXTS
from tuner.errors import TunerError

ALPHA = "alpha"  # Item.mask for masks read from the image's own alpha channel


class BadMask(Exception):
    """A mask that cannot be used (missing, unreadable, another size than its image, empty);
    its image is skipped with a warning, as a bad image is."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def mask_dir_of(entry) -> str | None:
    return getattr(entry, "mask_dir", None)


def find_mask(record, entry, data, raw: bytes, image_size: tuple[int, int]):
    """(mask reference, mask hash) for one image, or (None, "") when it has no mask.

    Raises BadMask when the image should have a mask that cannot be used."""
    mask_dir = mask_dir_of(entry)
    if not mask_dir and not data.alpha_mask:
        return None, ""
    if data.alpha_mask:
        mask = alpha_of(raw)
        ref, digest = ALPHA, hashlib.sha256(b"alpha\0" + raw).hexdigest()
    else:
        ref = partner_path(record, entry.path, mask_dir)
        try:
            mask_bytes = Path(ref).read_bytes()
            mask = decode_mask(mask_bytes)
        except (OSError, BadMask) as exc:
            reason = exc.reason if isinstance(exc, BadMask) else type(exc).__name__
            raise BadMask(f"unreadable mask {ref} ({reason})") from exc
        digest = hashlib.sha256(mask_bytes).hexdigest()
    if mask.size != image_size:
        raise BadMask(
            f"mask {ref} is {mask.size[0]}x{mask.size[1]}, its image "
            f"{image_size[0]}x{image_size[1]}; masks must have their image's size"
        )
    if data.unmasked_weight == 0 and not np.asarray(mask).any():
        raise BadMask(f"mask {ref} is all black, so the image would train nothing")
    return ref, digest


def partner_path(record, dataset_path: str, mask_dir: str) -> str:
    """The mask with the image's stem (and subfolder) in mask_dir, any image extension."""
    if not isinstance(record.image, str):
        raise TunerError(
            f"{dataset_path}: mask_dir applies to folder datasets (images as files); this one "
            "embeds its images, so use data.alpha_mask or a folder of images"
        )
    relative = os.path.relpath(record.image, os.path.abspath(os.path.expanduser(dataset_path)))
    stem = Path(os.path.expanduser(mask_dir)) / Path(relative).with_suffix("")
    for ext in IMAGE_EXTS:
        for candidate in (stem.with_name(stem.name + ext), stem.with_name(stem.name + ext.upper())):
            if candidate.is_file():
                return str(candidate)
    raise BadMask(f"no mask {stem}.png (or .jpg, .webp, .bmp) for it in {mask_dir}")


def decode_mask(data: bytes) -> Image.Image:
    """A mask file as an upright 8-bit grayscale image (colour masks: their luminance)."""
    if not data:
        raise BadMask("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = img.convert("RGBA").convert("RGB")  # a drawn mask: its colour, not alpha
            return img.convert("L")
    except BadMask:
        raise
    except Exception as exc:  # PIL raises many types
        raise BadMask(str(exc) or type(exc).__name__) from exc


def alpha_of(raw: bytes) -> Image.Image:
    """The image's alpha channel as a grayscale mask."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if "A" not in img.getbands():
                raise BadMask("data.alpha_mask is on but the image has no alpha channel")
            return img.getchannel("A")
    except BadMask:
        raise
    except Exception as exc:
        raise BadMask(str(exc) or type(exc).__name__) from exc


def load_mask(item) -> Image.Image:
    if item.mask == ALPHA:
        image = item.record.image
        return alpha_of(image if isinstance(image, bytes) else Path(image).read_bytes())
    return decode_mask(Path(item.mask).read_bytes())


def prepare_mask(item, crop: str, flip: bool, rng_state) -> torch.Tensor:
    """The item's mask at its training size, shape (1, height, width), values in [0, 1].

    rng_state: the crop generator's state before the image was cropped, so a random crop
    takes the same offsets (mask and image have the same size)."""
    rng = None
    if rng_state is not None:
        rng = random.Random()
        rng.setstate(rng_state)
    mask, _, _ = resize_and_crop(load_mask(item), item.size, crop=crop, rng=rng)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area average of a (..., 1, H, W) mask onto a (h, w) latent grid."""
    if tuple(mask.shape[-2:]) == tuple(grid):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return F.interpolate(flat, size=tuple(grid), mode="area").reshape(*lead, *grid)
