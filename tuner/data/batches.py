"""Training samples and batches, from the cache when possible, from pixels otherwise."""

from __future__ import annotations

import dataclasses
import logging
import random

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tuner.data.cache import TensorCache, latent_key, text_key
from tuner.data.captions import process_caption
from tuner.data.dataset import Item, prepare_image

log = logging.getLogger("tuner")


@dataclasses.dataclass
class CachePlan:
    """What is cached this run (decided once, before training)."""

    latents: TensorCache | None
    texts: TensorCache | None
    identity: str
    crop: str  # effective crop mode ("center" when latents are cached)


class TrainDataset(Dataset):
    """Indexed by (item index, epoch, position): all per-step randomness (flip, caption
    dropout and shuffle, random crop, prior pairing) is derived from that key."""

    def __init__(
        self,
        items: list[Item],
        data,
        plan: CachePlan,
        seed: int,
        class_items: list[Item] | None = None,
    ):
        self.items, self.data, self.plan, self.seed = items, data, plan, seed
        self.class_items = class_items or []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> list[dict]:
        index, epoch, position = key
        rng = random.Random(f"{self.seed}/{epoch}/{position}/{index}")
        item = self.items[index]
        samples = [self.sample(item, rng, is_prior=False)]
        if self.class_items:
            partner = self.class_items[rng.randrange(len(self.class_items))]
            # The class image trains at its instance's size so both stack into one batch.
            partner = dataclasses.replace(partner, size=item.size)
            samples.append(self.sample(partner, rng, is_prior=True))
        return samples

    def sample(self, item: Item, rng: random.Random, is_prior: bool) -> dict:
        data, plan = self.data, self.plan
        flip = data.flip and rng.random() < 0.5
        caption = process_caption(
            item.raw_caption,
            prefix=item.prefix,
            suffix=item.suffix,
            shuffle_tags=data.shuffle_tags,
            keep_tokens=data.keep_tokens,
            dropout=data.caption_dropout,
            rng=rng,
        )
        out: dict = {"is_prior": is_prior}
        if plan.latents is not None:
            key = latent_key(item.image_hash, item.size, plan.crop, flip, plan.identity)
            out.update(plan.latents.load(key))
        else:
            pixels, crop_top_left, original_size = prepare_image(item, plan.crop, flip, rng)
            out.update(
                pixels=pixels,
                crop_top_left=torch.tensor(crop_top_left),
                original_size=torch.tensor(original_size),
            )
        out["target_size"] = torch.tensor((item.size[1], item.size[0]))
        if plan.texts is not None:
            out["cond"] = plan.texts.load(text_key(caption, plan.identity))
        else:
            out["caption"] = caption
        return out


def collate(groups: list[list[dict]]) -> dict:
    """Instances first, then their prior partners, so `is_prior` marks the tail."""
    samples = [group[0] for group in groups] + [s for group in groups for s in group[1:]]
    batch: dict = {"is_prior": torch.tensor([s["is_prior"] for s in samples])}
    for name in ("latents", "pixels", "crop_top_left", "original_size", "target_size"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    if "cond" in samples[0]:
        batch["cond"] = {
            k: torch.stack([s["cond"][k] for s in samples]) for k in samples[0]["cond"]
        }
    else:
        batch["captions"] = [s["caption"] for s in samples]
    return batch


# --- building the cache ------------------------------------------------------------------


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
    comps.vae.to(device)
    by_size: dict[tuple[int, int], list[str]] = {}
    for key, (item, _) in todo.items():
        by_size.setdefault(item.size, []).append(key)
    bar = tqdm(total=len(todo), desc="caching latents", unit="img")
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
    bar.close()


def _cache_texts(captions, plan, family, comps, device, batch_size, stats) -> None:
    todo = [c for c in captions if not plan.texts.has(text_key(c, plan.identity))]
    stats["hit"] += len(captions) - len(todo)
    if not todo:
        return
    for encoder in comps.text_encoders.values():
        encoder.to(device)
    for start in tqdm(range(0, len(todo), batch_size), desc="caching prompts", unit="batch"):
        chunk = todo[start : start + batch_size]
        encoded = family.encode_prompts(comps, chunk)
        for row, caption in enumerate(chunk):
            plan.texts.save(
                text_key(caption, plan.identity),
                {name: value[row] for name, value in encoded.items()},
            )
        stats["made"] += len(chunk)
