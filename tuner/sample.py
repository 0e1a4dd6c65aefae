"""Sampling with diffusers pipelines, and labelled evaluation grids."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger("tuner")

SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


@dataclass
class Cell:
    prompt: str
    seed: int
    scale: float = 1.0
    step: int | None = None
    adapter: str = ""
    image: Image.Image | None = field(default=None, repr=False)

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "image"}


def set_scheduler(pipe, name: str) -> None:
    if name in ("default", None):
        return
    import diffusers

    if getattr(pipe.scheduler.config, "_class_name", "").startswith("FlowMatch"):
        log.warning("scheduler %s does not apply to flow-matching models; using the default", name)
        return
    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@contextlib.contextmanager
def lora_scale(modules, scale: float):
    """Temporarily multiply every LoRA layer's scaling (0 = the base model)."""
    from peft.tuners.lora import LoraLayer

    saved = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                for name, value in layer.scaling.items():
                    saved.append((layer, name, value))
                    layer.scaling[name] = value * scale
    try:
        yield
    finally:
        for layer, name, value in saved:
            layer.scaling[name] = value


def pipeline_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]


@torch.no_grad()
def render_batch(pipe, cells: list[Cell], *, steps: int, guidance: float,
                 negative_prompt: str = "", width: int, height: int, device) -> list[Image.Image]:
    """One pipeline call for cells sharing a scale; one generator per cell, so each image is
    the same as rendering it alone."""
    generators = [torch.Generator(device).manual_seed(cell.seed) for cell in cells]
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "width": width,
              "height": height, "generator": generators, "output_type": "pil"}
    if negative_prompt:
        kwargs["negative_prompt"] = [negative_prompt] * len(cells)
    with lora_scale(pipeline_modules(pipe), cells[0].scale):
        return pipe([cell.prompt for cell in cells], **kwargs).images


def render(pipe, cell: Cell, **kwargs) -> Image.Image:
    return render_batch(pipe, [cell], **kwargs)[0]


def png_info(settings: dict) -> PngInfo:
    info = PngInfo()
    info.add_text("tuner", json.dumps(settings))
    return info


# --- grids -------------------------------------------------------------------------------

AXES = ("prompt", "seed", "scale", "step", "adapter")


def label_of(cell: Cell, axes: tuple[str, ...]) -> str:
    parts = []
    for axis in axes:
        value = getattr(cell, axis)
        parts.append(f"{axis} {value}" if axis in ("seed", "scale", "step") else str(value))
    return " | ".join(parts)


def make_grid(cells: list[Cell], rows: tuple[str, ...], cols: tuple[str, ...]):
    """Lay out cells by their row and column keys, draw labels; returns (image, index)."""
    row_keys = list(dict.fromkeys(tuple(getattr(c, a) for a in rows) for c in cells))
    col_keys = list(dict.fromkeys(tuple(getattr(c, a) for a in cols) for c in cells))
    width, height = cells[0].image.size
    label_h = max(14, height // 8)
    font = _font(max(10, label_h - 4))
    sheet = Image.new("RGB", (width * len(col_keys), (height + label_h) * len(row_keys)), "white")
    draw = ImageDraw.Draw(sheet)
    index = []
    for cell in cells:
        r = row_keys.index(tuple(getattr(cell, a) for a in rows))
        c = col_keys.index(tuple(getattr(cell, a) for a in cols))
        x, y = c * width, r * (height + label_h)
        text = label_of(cell, rows + cols)
        draw.text((x + 2, y + 1), _fit(draw, text, font, width - 4), fill="black", font=font)
        sheet.paste(cell.image.convert("RGB"), (x, y + label_h))
        index.append({"row": r, "col": c, "label": text, **cell.settings()})
    meta = {"rows": list(rows), "cols": list(cols), "cell_width": width,
            "cell_height": height + label_h, "n_rows": len(row_keys), "n_cols": len(col_keys),
            "cells": index}
    return sheet, meta


def save_grid(sheet: Image.Image, meta: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, pnginfo=png_info({"grid": meta["rows"] + meta["cols"]}))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


# --- during training ------------------------------------------------------------------------


def training_grid(recipe, output_dir: Path, family, comps, step: int, accelerator) -> Path | None:
    """Grid of the recipe's fixed prompts x seeds (rows) x adapter scales (columns)."""
    prompts = recipe.sample.prompts
    if not prompts:
        return None
    device = accelerator.device
    moved = _to_device(comps, device)
    pipe = family.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, recipe.sample.scheduler)
    size = recipe.data.resolution
    cells = []
    was_training = comps.denoiser.training
    comps.denoiser.eval()
    for prompt in prompts:
        for seed in recipe.sample.seeds:
            for scale in recipe.sample.scales:
                cell = Cell(prompt, seed, scale, step)
                cell.image = render(pipe, cell, steps=recipe.sample.steps,
                                    guidance=recipe.sample.guidance,
                                    negative_prompt=recipe.sample.negative_prompt,
                                    width=recipe.sample.width or size,
                                    height=recipe.sample.height or size, device=device)
                cells.append(cell)
    comps.denoiser.train(was_training)
    for module in moved:
        module.to("cpu")
    sheet, meta = make_grid(cells, ("prompt", "seed"), ("scale",))
    path = save_grid(sheet, meta, Path(output_dir) / "samples" / f"step-{step:06d}.png")
    _log_images(accelerator, sheet, step)
    return path


def _to_device(comps, device) -> list[torch.nn.Module]:
    moved = []
    for module in [comps.vae, *comps.text_encoders.values()]:
        if next(module.parameters()).device != torch.device(device) and device.type != "cpu":
            module.to(device)
            moved.append(module)
    return moved


def _log_images(accelerator, sheet: Image.Image, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(sheet), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(sheet)]}, step=step)
