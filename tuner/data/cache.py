"""On-disk caches of VAE latents and text-encoder outputs (safetensors, content-addressed).

A key is a hash of everything that changes the tensor: image bytes, size, crop and flip for
latents; the final caption for text; and the model identity for both. So a changed input
invalidates exactly its own entries, and a second run finds every entry and never touches the
VAE or text encoders.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tuner import files
from tuner.data.items import Item, prepare_controls, prepare_image
from tuner.data.masks import mask_to_grid
from tuner.data.pairs import partner_image, reference_size
from tuner.devices import on_device
from tuner.errors import TunerError

log = logging.getLogger("tuner")


def default_cache_dir() -> Path:
    root = os.environ.get("TUNER_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuner"


@functools.lru_cache(maxsize=1 << 16)  # the same few keys every epoch: a quarter of loading a batch
def digest(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


class TensorCache:
    """A folder of `<key>.safetensors` files, written atomically.

    keep_bytes: entries loaded for training stay in memory up to this many bytes, so every
    epoch after the first reads no files (opening and reading 8 small files per toy batch cost
    ~2-5 % of a toy step)."""

    def __init__(self, root: Path, kind: str, keep_bytes: int = 0):
        self.root = Path(root) / kind
        self.keep_bytes, self.kept_bytes = keep_bytes, 0
        self.kept: dict[str, dict[str, torch.Tensor]] = {}

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """From the file, always (the cache checks and heals what the file holds)."""
        return load_file(str(self.path(key)))

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """For training: from memory once read. Callers stack or copy, never write into it."""
        kept = self.kept.get(key)
        if kept is not None:
            return dict(kept)
        tensors = self.read(key)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.kept_bytes + size <= self.keep_bytes:
            self.kept[key], self.kept_bytes = tensors, self.kept_bytes + size
        return dict(tensors)

    def problem(self, key: str, expected: dict[str, tuple] | None = None) -> str | None:
        """Why the entry cannot be used (unreadable, a shape or dtype the model does not make,
        non-finite values), or None when it is fine."""
        try:
            tensors = self.read(key)
        except Exception as exc:  # truncated, zero bytes, garbage header: all unusable
            return f"unreadable: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
        for name, shape in (expected or {}).items():
            if name not in tensors:
                return f"no {name!r} tensor"
            tensor = tensors[name]
            if tensor.dtype != torch.float32:
                return f"{name} is {tensor.dtype}, not torch.float32"
            if tuple(tensor.shape) != tuple(shape):
                return f"{name} has shape {tuple(tensor.shape)}; the model makes {tuple(shape)}"
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"non-finite values in {name}"
        return None

    def discard(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # Atomic: readers never see a half-written entry.
        files.save_safetensors(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            self.path(key),
            hint="free space, or set data.cache_dir to a folder on a disk with room",
        )


def latent_key(
    image_hash: str,
    size: tuple[int, int],
    crop: str,
    flip: bool,
    identity: str,
    mask_hash: str = "",
) -> str:
    # An entry with a mask holds it too; without one the key is what it always was.
    if mask_hash:
        return digest("latent", image_hash, size, crop, flip, identity, "mask", mask_hash)
    return digest("latent", image_hash, size, crop, flip, identity)


def item_latent_key(item: Item, plan: CachePlan, flip: bool) -> str:
    return latent_key(item.image_hash, item.size, plan.crop, flip, plan.identity, item.mask_hash)


def control_key(item: Item, index: int, plan: CachePlan, flip: bool) -> str:
    """A reference image's latent: its bytes, and the target's own size and bucket (the
    reference is resized to the target before the shared crop), or the family's own
    reference size (then the target's size does not matter)."""
    partner = item.controls[index]
    if plan.reference_area:
        return digest(
            "control", partner.image_hash, "area", plan.reference_area, flip, plan.identity
        )
    return digest(
        "control", partner.image_hash, item.source_size, item.size, plan.crop, flip, plan.identity
    )


def text_key(caption: str, identity: str, references: str = "") -> str:
    # references: for encoders that read the reference images, what they were (item_text_key)
    if references:
        return digest("text", caption, identity, "references", references)
    return digest("text", caption, identity)


def item_text_key(caption: str, item: Item, plan: CachePlan, flip: bool) -> str:
    """The prompt's key: the caption, plus the (flipped) reference images when the family's
    text encoder reads them."""
    if not (plan.prompt_reads_references and item.controls):
        return text_key(caption, plan.identity)
    references = ",".join(p.image_hash for p in item.controls)
    return text_key(caption, plan.identity, f"{references}:flip={flip}")


@dataclasses.dataclass
class CachePlan:
    """What is cached this run (decided once, before training)."""

    latents: TensorCache | None
    texts: TensorCache | None
    identity: str
    crop: str  # effective crop mode ("center" when latents are cached)
    reference_area: int = 0  # FamilySpec.reference_area: how references are sized
    prompt_reads_references: bool = False  # FamilySpec.prompt_reads_references


def report_unusable(kind: str, bad: list[tuple[Path, str]]) -> None:
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        log.warning(
            "cache: %d %s entr%s could not be used: %s: %s%s; deleted, encoding again",
            len(bad),
            kind,
            "y" if len(bad) == 1 else "ies",
            path,
            reason,
            more,
        )


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise TunerError(
            f"{what}: the model made non-finite values (an fp16 overflow?); train with "
            "train.mixed_precision=bf16 or no, or use a VAE that is fp16-safe (model.vae_path)"
        )


@torch.no_grad()
def build_cache(
    items: list[Item], data, plan: CachePlan, family, comps, device, batch_size: int = 8
) -> dict[str, int]:
    """Encode every missing latent / prompt once. Returns hit/made counts.

    Each hit is checked here once (readable, finite, the shape and dtype the model makes), so
    the training step never pays for it: an unusable entry is reported, deleted and made
    again."""
    stats = {"hit": 0, "made": 0}
    if plan.latents is not None:
        _cache_latents(items, data, plan, family, comps, device, batch_size, stats)
    if plan.texts is not None:
        _cache_texts(_text_jobs(items, data, plan), plan, family, comps, device, batch_size, stats)
    return stats


def _text_jobs(items: list[Item], data, plan: CachePlan) -> dict[str, tuple]:
    """key -> (caption, item, flip) of every prompt training can ask for; item is None when
    the text encoder reads no references (then a caption is one entry however many items)."""
    jobs: dict[str, tuple] = {}
    dropped = {""} if data.caption_dropout else set()
    for item in items:
        reads = plan.prompt_reads_references and item.controls
        for flip in (False, True) if data.flip and reads else (False,):
            for caption in sorted({item.caption} | dropped):
                key = item_text_key(caption, item, plan, flip)
                jobs.setdefault(key, (caption, item if reads else None, flip))
    return dict(sorted(jobs.items(), key=lambda job: job[1][0]))


def _latent_jobs(item: Item, flip: bool, plan: CachePlan):
    """(key, which image) of one item: the target (None) and each reference (its index)."""
    yield item_latent_key(item, plan, flip), None
    for index in range(len(item.controls)):
        yield control_key(item, index, plan, flip), index


def _cache_latents(items, data, plan, family, comps, device, batch_size, stats) -> None:
    todo: dict[str, tuple[Item, bool, int | None]] = {}
    seen: set[str] = set()
    bad: list[tuple[Path, str]] = []
    jobs = (
        (item, flip, key, which)
        for item in items
        for flip in ((False, True) if data.flip else (False,))
        for key, which in _latent_jobs(item, flip, plan)
    )
    for item, flip, key, which in jobs:
        if key in todo or key in seen:
            continue
        seen.add(key)
        if plan.latents.has(key):
            shape = family.latent_shape(comps, reference_pixels(item, which, plan))
            expected = {"latents": shape}
            if item.mask and which is None:  # masks belong to targets, not references
                expected["mask"] = (1, *shape[-2:])
            problem = plan.latents.problem(key, expected)
            if problem is None:
                stats["hit"] += 1
                continue
            bad.append((plan.latents.path(key), problem))
            plan.latents.discard(key)
        todo[key] = (item, flip, which)
    report_unusable("latent", bad)
    if not todo:
        return
    by_size: dict[tuple, list[str]] = {}
    for key, (item, _, which) in todo.items():
        # targets and references apart: they are encoded differently (sample vs mode)
        by_size.setdefault((reference_pixels(item, which, plan), which is None), []).append(key)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img")
    with on_device([comps.vae], device):
        _encode_latents(todo, by_size, plan, family, comps, device, batch_size, stats, bar)
    bar.close()


def _encode_latents(todo, by_size, plan, family, comps, device, batch_size, stats, bar) -> None:
    for keys in by_size.values():
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            prepared = [_prepare(*todo[k], plan) for k in chunk]
            pixels = torch.stack([p[0] for p in prepared]).to(device)
            if todo[chunk[0]][2] is not None:
                latents = family.encode_controls(comps, pixels)
            else:
                # Seeded by the first entry's key, so a cached latent never depends on run order.
                generator = torch.Generator(device).manual_seed(int(chunk[0][:12], 16))
                latents = family.encode_images(comps, pixels, generator)
            for key, (_, crop_top_left, original_size, mask), latent in zip(
                chunk, prepared, latents
            ):
                check_finite(latent, f"latent of {todo[key][0].record.key}")
                entry = {
                    "latents": latent.float(),
                    "crop_top_left": torch.tensor(crop_top_left),
                    "original_size": torch.tensor(original_size),
                }
                if mask is not None:  # on the latent grid: what the loss weights with
                    entry["mask"] = mask_to_grid(mask, tuple(latent.shape[-2:]))
                plan.latents.save(key, entry)
            stats["made"] += len(chunk)
            bar.update(len(chunk))


def reference_pixels(item: Item, which: int | None, plan: CachePlan) -> tuple[int, int]:
    """(width, height) the target (which=None) or reference `which` is encoded at."""
    if which is None or not plan.reference_area:
        return item.size
    return reference_size(plan.reference_area, item.controls[which].size)


def _prepare(item: Item, flip: bool, which: int | None, plan: CachePlan):
    if which is None:
        return prepare_image(item, plan.crop, flip, None)
    pixels = prepare_controls(item, plan.crop, flip, None, plan.reference_area)[which]
    return pixels, (0, 0), (item.source_size[1], item.source_size[0]), None


def _cache_texts(jobs: dict[str, tuple], plan, family, comps, device, batch_size, stats) -> None:
    todo, bad = [], []
    for key in jobs:
        if plan.texts.has(key):
            problem = plan.texts.problem(key)
            if problem is None:
                continue
            bad.append((plan.texts.path(key), problem))
            plan.texts.discard(key)
        todo.append(key)
    report_unusable("prompt", bad)
    stats["hit"] += len(jobs) - len(todo)
    if not todo:
        return
    with family.text_encoding_phase(comps, device):
        for start in tqdm(range(0, len(todo), batch_size), desc="caching prompts", unit="batch"):
            chunk = todo[start : start + batch_size]
            captions = [jobs[key][0] for key in chunk]
            encoded = family.encode_prompts(comps, captions, **_references(chunk, jobs))
            for row, (key, caption) in enumerate(zip(chunk, captions)):
                for name, value in encoded.items():
                    if value.is_floating_point():
                        check_finite(value[row], f"{name} of the caption {caption!r}")
                plan.texts.save(key, {name: value[row] for name, value in encoded.items()})
            stats["made"] += len(chunk)


def _references(chunk: list[str], jobs: dict[str, tuple]) -> dict:
    """encode_prompts' `references` argument for a chunk of prompts that read them."""
    if jobs[chunk[0]][1] is None:
        return {}
    return {
        "references": [
            [partner_image(p, jobs[key][2]) for p in jobs[key][1].controls] for key in chunk
        ]
    }
