"""DreamBooth: an instance dataset plus prior-preservation class images made by the base model.

There is no second trainer: the instance folder becomes one more data source, and class images
are paired with instance samples in each batch (see TrainDataset), weighted in the loss.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner import files
from tuner.data.cache import default_cache_dir, digest
from tuner.data.images import IMAGE_EXTS
from tuner.data.items import DataReport, _items_of
from tuner.data.sources import list_records
from tuner.devices import on_device
from tuner.errors import TunerError
from tuner.families import text_encoders
from tuner.recipe import DatasetEntry

log = logging.getLogger("tuner")


def instance_sources(recipe) -> list:
    """The instance folder as a data source; per-image captions win over instance_prompt."""
    db = recipe.dreambooth
    if db is None:
        return []
    folder = Path(db.instance_dir).expanduser()
    if not folder.is_dir():
        raise TunerError(
            f"dreambooth.instance_dir: {db.instance_dir} not found; point it at a "
            "folder of 3-30 photos of the subject"
        )
    if not any(p.suffix.lower() in IMAGE_EXTS for p in folder.rglob("*")):
        raise TunerError(
            f"dreambooth.instance_dir: {db.instance_dir} has no images "
            "(jpg, png, webp, bmp); add photos of the subject"
        )
    entry = DatasetEntry(path=str(folder), default_caption=db.instance_prompt, mask_dir=db.mask_dir)
    return [(entry, None)]


def class_dir(recipe, comps) -> Path:
    db = recipe.dreambooth
    if db.class_dir:
        return Path(db.class_dir).expanduser()
    # Default: shared per (model, prompt), so every run on the same base reuses them.
    root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir()
    return root / "class_images" / digest(comps.identity, db.class_prompt)


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"class-{index:05d}.png"


def missing_indices(folder: Path, wanted: int) -> list[int]:
    return [i for i in range(wanted) if not class_image_path(folder, i).is_file()]


def class_items(recipe, family, comps, accelerator) -> list:
    db = recipe.dreambooth
    if db is None or not db.with_prior_preservation:
        return []
    folder = class_dir(recipe, comps)
    if accelerator.is_main_process:
        generate_class_images(recipe, family, comps, folder, accelerator.device)
    accelerator.wait_for_everyone()
    records = list_records(str(folder), source=10_000)
    wanted = {class_image_path(folder, i).name for i in range(db.num_class_images)}
    records = [r for r in records if Path(r.image).name in wanted]
    entry = DatasetEntry(path=str(folder), default_caption=db.class_prompt)
    items = _items_of(records, entry, recipe.data, DataReport(), role="class")
    log.info("prior preservation: %d class images from %s", len(items), folder)
    return items


@torch.no_grad()
def generate_class_images(recipe, family, comps, folder: Path, device) -> int:
    """Render the missing class images (batched, one seed per image index). Each image is
    written with its prompt as soon as it exists, so an interrupted run resumes where it
    stopped. Returns how many were made."""
    db = recipe.dreambooth
    todo = missing_indices(folder, db.num_class_images)
    if not todo:
        log.info("class images: all %d present in %s", db.num_class_images, folder)
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    pipe = family.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    calls = class_calls(recipe, pipe, todo, device)
    # Every module on the device for this phase only: caching next puts just the encoders it
    # needs there (T5-XXL must not sit beside a Flux transformer).
    visiting = list(comps.modules().values())
    if text_encoders.keep_off_device(comps):
        # Quantized/offloaded encoders never join the denoiser: the class prompt is encoded
        # first with only them on the device, then the images render without them.
        text_encoders.pre_encode(comps, pipe, device, [call for _, _, call in calls])
        text_encoders.use_encoded_prompts(pipe, comps, device)
        visiting = [comps.denoiser, comps.vae]
    with on_device(visiting, device):
        render_class_images(recipe, folder, calls, len(todo))
    return len(todo)


def class_calls(recipe, pipe, todo: list[int], device) -> list:
    """(image indices, cells, the pipeline call rendering them) per class-generation batch."""
    from tuner.inference.render import Cell, render_batch

    db = recipe.dreambooth
    size = recipe.data.resolution
    calls = []
    for start in range(0, len(todo), db.class_generation_batch):
        chunk = todo[start : start + db.class_generation_batch]
        cells = [Cell(db.class_prompt, recipe.train.seed * 100_003 + i) for i in chunk]
        call = functools.partial(
            render_batch,
            pipe,
            cells,
            steps=db.class_generation_steps,
            guidance=recipe.sample.guidance,
            width=size,
            height=size,
            device=device,
            max_sequence_length=recipe.train.max_sequence_length,
        )
        calls.append((chunk, cells, call))
    return calls


def render_class_images(recipe, folder: Path, calls: list, total: int) -> None:
    from tuner.inference.render import png_info

    db = recipe.dreambooth
    bar = tqdm(total=total, desc="generating class images", unit="img")
    for chunk, cells, call in calls:
        images = call()
        for index, cell, image in zip(chunk, cells, images):
            path = class_image_path(folder, index)
            # The caption first: a class image on disk always has its caption.
            files.write_text(path.with_suffix(".txt"), db.class_prompt)
            files.save_image(image, path, format="PNG", pnginfo=png_info(cell.settings()))
        bar.update(len(chunk))
    bar.close()
