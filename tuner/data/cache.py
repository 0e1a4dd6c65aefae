"""On-disk caches of VAE latents and text-encoder outputs (safetensors, content-addressed).

A key is a hash of everything that changes the tensor: image bytes, size, crop and flip for
latents; the final caption for text; and the model identity for both. So a changed input
invalidates exactly its own entries, and a second run finds every entry and never touches the
VAE or text encoders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def default_cache_dir() -> Path:
    root = os.environ.get("TUNER_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuner"


def digest(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


class TensorCache:
    """A folder of `<key>.safetensors` files, written atomically."""

    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)  # readers never see a half-written entry


def latent_key(image_hash: str, size: tuple[int, int], crop: str, flip: bool, identity: str) -> str:
    return digest("latent", image_hash, size, crop, flip, identity)


def text_key(caption: str, identity: str) -> str:
    return digest("text", caption, identity)
