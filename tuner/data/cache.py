"""On-disk caches of VAE latents and text-encoder outputs (safetensors, content-addressed).

A key is a hash of everything that changes the tensor: image bytes, size, crop and flip for
latents; the final caption for text; and the model identity for both. So a changed input
invalidates exactly its own entries, and a second run finds every entry and never touches the
VAE or text encoders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tuner.data.items import Item, prepare_image
from tuner.devices import on_device


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


@dataclasses.dataclass
class CachePlan:
    """What is cached this run (decided once, before training)."""

    latents: TensorCache | None
    texts: TensorCache | None
    identity: str
    crop: str  # effective crop mode ("center" when latents are cached)


@torch.no_grad()
def build_cache(
    items: list[Item], data, plan: CachePlan, family, comps, device, batch_size: int = 8
) -> dict[str, int]:
    """Encode every missing latent / prompt once. Returns hit/made counts."""
    stats = {"hit": 0, "made": 0}
    if plan.latents is not None:
        _cache_latents(items, data, plan, family, comps, device, batch_size, stats)
    if plan.texts is not None:
        captions = sorted(
            {item.caption for item in items} | ({""} if data.caption_dropout else set())
        )
        _cache_texts(captions, plan, family, comps, device, batch_size, stats)
    return stats


def _cache_latents(items, data, plan, family, comps, device, batch_size, stats) -> None:
    todo: dict[str, tuple[Item, bool]] = {}
    for item in items:
        for flip in (False, True) if data.flip else (False,):
            key = latent_key(item.image_hash, item.size, plan.crop, flip, plan.identity)
            if key in todo:
                continue
            if plan.latents.has(key):
                stats["hit"] += 1
            else:
                todo[key] = (item, flip)
    if not todo:
        return
    by_size: dict[tuple[int, int], list[str]] = {}
    for key, (item, _) in todo.items():
        by_size.setdefault(item.size, []).append(key)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img")
    with on_device([comps.vae], device):
        _encode_latents(todo, by_size, plan, family, comps, device, batch_size, stats, bar)
    bar.close()


def _encode_latents(todo, by_size, plan, family, comps, device, batch_size, stats, bar) -> None:
    for keys in by_size.values():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            prepared = [prepare_image(todo[k][0], plan.crop, todo[k][1], None) for k in chunk]
            pixels = torch.stack([p[0] for p in prepared]).to(device)
            # Seeded by the first entry's key, so a cached latent never depends on run order.
            generator = torch.Generator(device).manual_seed(int(chunk[0][:12], 16))
            latents = family.encode_images(comps, pixels, generator)
            for key, (_, crop_top_left, original_size), latent in zip(chunk, prepared, latents):
                plan.latents.save(
                    key,
                    {
                        "latents": latent.float(),
                        "crop_top_left": torch.tensor(crop_top_left),
                        "original_size": torch.tensor(original_size),
                    },
                )
            stats["made"] += len(chunk)
            bar.update(len(chunk))


def _cache_texts(captions, plan, family, comps, device, batch_size, stats) -> None:
    todo = [c for c in captions if not plan.texts.has(text_key(c, plan.identity))]
    stats["hit"] += len(captions) - len(todo)
    if not todo:
        return
    with on_device(comps.text_encoders.values(), device):
        for start in tqdm(range(0, len(todo), batch_size), desc="caching prompts", unit="batch"):
            chunk = todo[start : start + batch_size]
            encoded = family.encode_prompts(comps, chunk)
            for row, caption in enumerate(chunk):
                plan.texts.save(
                    text_key(caption, plan.identity),
                    {name: value[row] for name, value in encoded.items()},
                )
            stats["made"] += len(chunk)
