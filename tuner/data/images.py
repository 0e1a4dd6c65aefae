"""Image decoding: every training image goes through `load_image` so the rest of the
pipeline can assume an upright, fully-decoded RGB `PIL.Image`."""

from __future__ import annotations

import io
import os

from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Modes that carry an alpha channel we must flatten onto white rather than drop
# (dropping alpha usually reveals black or garbage in fully transparent pixels).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(Exception):
    """An image file that cannot be decoded. Not a TunerError: callers decide
    whether one bad file is fatal or merely skipped with a warning."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: unreadable image ({reason})")


def load_image(path_or_bytes: str | os.PathLike | bytes) -> Image.Image:
    """Decode an image from a path or raw bytes into an upright RGB image.

    Raises BadImage for empty, truncated or otherwise undecodable input."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        label = "<bytes>"
        data = bytes(path_or_bytes)
        if not data:
            raise BadImage(label, "empty file")
        source = io.BytesIO(data)
    else:
        label = os.fspath(path_or_bytes)
        try:
            if os.path.getsize(label) == 0:
                raise BadImage(label, "empty file")
        except OSError as e:
            raise BadImage(label, e.strerror or str(e)) from e
        source = label

    try:
        with Image.open(source) as img:
            # Full decode now, so a truncated file fails here and not mid-training.
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except BadImage:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise BadImage(label, str(e) or type(e).__name__) from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if img.mode == "P":
        # Palette images may declare a transparent index; expand it to real alpha first.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV") and "transparency" in img.info:
        img = img.convert("RGBA")

    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer grayscale: PIL's direct convert clips instead of scaling,
        # so rescale to 8 bits ourselves.
        return _wide_gray_to_rgb(img)

    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def _wide_gray_to_rgb(img: Image.Image) -> Image.Image:
    import numpy as np

    arr = np.asarray(img, dtype=np.float64)
    # 32-bit "I" is often 16-bit data in disguise (e.g. some PNG/TIFF decoders).
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
