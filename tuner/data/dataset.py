"""The training Dataset: samples from the cache when possible, from pixels otherwise, and the
collate that stacks them into batches."""

from __future__ import annotations

import dataclasses
import logging
import random

import torch
from torch.utils.data import Dataset

from tuner.data.cache import CachePlan, control_key, item_latent_key, item_text_key
from tuner.data.captions import process_caption
from tuner.data.items import Item, prepare_controls, prepare_image
from tuner.data.pairs import partner_image

log = logging.getLogger("tuner")


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
            out.update(plan.latents.load(item_latent_key(item, plan, flip)))
            if item.controls:
                out["control_latents"] = [
                    plan.latents.load(control_key(item, i, plan, flip))["latents"]
                    for i in range(len(item.controls))
                ]
        else:
            crop_state = rng.getstate() if plan.crop == "random" else None
            pixels, crop_top_left, original_size, mask = prepare_image(item, plan.crop, flip, rng)
            if item.controls:  # the same crop window and flip as the target
                out["control_pixels"] = prepare_controls(
                    item, plan.crop, flip, crop_state, plan.reference_area
                )
            out.update(
                pixels=pixels,
                crop_top_left=torch.tensor(crop_top_left),
                original_size=torch.tensor(original_size),
            )
            if mask is not None:  # at pixel size; the loss averages it onto the latent grid
                out["mask"] = mask
        out["target_size"] = (item.size[1], item.size[0])  # a tensor per batch, in collate
        if plan.texts is not None:
            out["cond"] = plan.texts.load(item_text_key(caption, item, plan, flip))
        else:
            out["caption"] = caption
            if plan.prompt_reads_references and item.controls:  # encoded with the caption
                out["references"] = [partner_image(p, flip) for p in item.controls]
        return out


def collate(groups: list[list[dict]]) -> dict:
    """Instances first, then their prior partners, so `is_prior` marks the tail."""
    samples = [group[0] for group in groups] + [s for group in groups for s in group[1:]]
    batch: dict = {"is_prior": torch.tensor([s["is_prior"] for s in samples])}
    for name in ("latents", "pixels", "crop_top_left", "original_size"):
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    batch["target_size"] = torch.tensor([s["target_size"] for s in samples])
    masked = [s["mask"] for s in samples if "mask" in s]
    if masked:  # samples without a mask (prior images, unmasked datasets) train everywhere
        batch["mask"] = torch.stack([s.get("mask", torch.ones_like(masked[0])) for s in samples])
    for name in ("control_latents", "control_pixels"):  # one stack per reference position
        if name in samples[0]:
            batch[name] = [torch.stack(group) for group in zip(*(s[name] for s in samples))]
    if "cond" in samples[0]:
        batch["cond"] = {
            k: stack_padded([s["cond"][k] for s in samples]) for k in samples[0]["cond"]
        }
    else:
        batch["captions"] = [s["caption"] for s in samples]
    if "references" in samples[0]:
        batch["references"] = [s["references"] for s in samples]
    return batch


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stacked; prompts cached at their own length (a VL encoder's, whose image tokens make
    them differ, with a mask saying which are real) are zero-padded to the longest first."""
    longest = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == longest for t in tensors):
        return torch.stack(tensors)
    pad = [(0, 0) * (t.dim() - 1) + (0, longest - t.shape[0]) for t in tensors]
    return torch.stack([torch.nn.functional.pad(t, p) for t, p in zip(tensors, pad)])
