"""Sampling with diffusers pipelines, adapters loaded by diffusers, and labelled grids."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from tuner.errors import TunerError

log = logging.getLogger("tuner")

SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}
SCHEDULER_NAMES = ("default", *SCHEDULER_CLASSES)


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
    if name not in SCHEDULER_CLASSES:
        raise TunerError(f"scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}")
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


def pipeline_default(pipe, argument: str):
    """The pipeline's own default for a call argument (e.g. guidance_scale differs by family)."""
    parameter = inspect.signature(pipe.__call__).parameters.get(argument)
    return None if parameter is None else parameter.default


@torch.no_grad()
def render_batch(pipe, cells: list[Cell], *, steps: int, guidance: float | None,
                 negative_prompt: str = "", width: int | None, height: int | None,
                 device) -> list[Image.Image]:
    """One pipeline call for cells sharing a scale; one generator per cell, so each image is
    the same as rendering it alone. None settings keep the pipeline's defaults."""
    generators = [torch.Generator(device).manual_seed(cell.seed) for cell in cells]
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "width": width,
              "height": height, "generator": generators, "output_type": "pil"}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if negative_prompt:
        kwargs["negative_prompt"] = [negative_prompt] * len(cells)
    with lora_scale(pipeline_modules(pipe), cells[0].scale):
        return pipe([cell.prompt for cell in cells], **kwargs).images


def render(pipe, cell: Cell, **kwargs) -> Image.Image:
    return render_batch(pipe, [cell], **kwargs)[0]


def png_info(settings: dict) -> PngInfo:
    """Our settings as JSON under `tuner`; single images also get an A1111-style `parameters`."""
    info = PngInfo()
    info.add_text("tuner", json.dumps(settings))
    if "prompt" in settings:
        info.add_text("parameters", a1111_parameters(settings))
    return info


def a1111_parameters(s: dict) -> str:
    loras = " ".join(f"<lora:{Path(lora['path']).stem}:{lora['scale'] * s.get('scale', 1):g}>"
                     for lora in s.get("loras", []))
    lines = [f"{s['prompt']} {loras}".strip()]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = {"Steps": s.get("steps"), "Sampler": s.get("scheduler"),
              "CFG scale": s.get("guidance"), "Seed": s.get("seed"),
              "Size": f"{s.get('width')}x{s.get('height')}", "Model": s.get("model")}
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


# --- base models and adapters loaded through diffusers ----------------------------------------


@dataclass
class LoraSpec:
    """One adapter file as the pipeline knows it."""

    path: Path
    scale: float
    name: str  # adapter name inside the pipeline (unique)
    label: str  # what grids and metadata call it


@dataclass
class AdapterChoice:
    """A set of adapters active together (one grid column, or all of `tuner sample --lora`)."""

    label: str
    loras: list[LoraSpec]
    step: int | None = None


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH' or 'PATH:SCALE' -> (path, scale)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def adapter_file(path: str | Path) -> Path:
    """An output dir (its diffusers file, else its kohya file) or a .safetensors file."""
    from tuner.adapters import KOHYA_WEIGHT_NAME, WEIGHT_NAME

    found = Path(path).expanduser()
    if found.is_dir():
        for name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            if (found / name).is_file():
                return found / name
        raise TunerError(f"{path}: no {WEIGHT_NAME} or {KOHYA_WEIGHT_NAME} in this folder; give "
                         "a training output dir or a .safetensors adapter file")
    if found.is_file() and found.suffix == ".safetensors":
        return found
    raise TunerError(f"{path}: adapter not found; give a training output dir or a .safetensors "
                     "adapter file (diffusers or kohya layout)")


def lora_specs(texts: list[str]) -> list[LoraSpec]:
    specs = []
    for i, text in enumerate(texts):
        path, scale = parse_lora(text)
        file = adapter_file(path)
        label = Path(path).resolve().name if Path(path).is_dir() else file.stem
        if any(spec.label == label for spec in specs):
            label = f"{label}#{i + 1}"  # grid columns and the index need distinct labels
        specs.append(LoraSpec(file, scale, f"adapter{i}", label))
    return specs


def load_base(model_path: str, family_name: str | None = None, dtype=torch.float32):
    """(family, pipeline) for a hub id, folder, single file or builtin."""
    from tuner import families
    from tuner.recipe import ModelSection

    model = ModelSection(path=model_path, family=family_name)
    family = families.for_model(model)
    pipe = family.build_pipeline(family.load(model, dtype))
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def load_adapters(pipe, family, specs: list[LoraSpec]) -> None:
    """Each file through diffusers' own loader, under its own name; every LoRA module in the
    file must land on a layer (a silently dropped key is the classic 'lora key not loaded')."""
    from tuner.export import DOWN_KINDS, adapter_format, kohya_scales_uniform, read_adapter

    for spec in specs:
        state, _ = read_adapter(spec.path)
        kind = adapter_format(state)
        with tempfile.TemporaryDirectory(prefix="tuner-lora-") as tmp:
            file = spec.path
            if kind == "kohya" and not kohya_scales_uniform(state):
                file = kohya_file_as_diffusers(pipe, family, state, Path(tmp))
            _load_lora_file(pipe, file, spec)
        kinds = ("lora_down",) if kind == "kohya" else DOWN_KINDS
        expected = sum(1 for key in state if any(f".{k}." in key for k in kinds))
        loaded = count_lora_layers(pipe, spec.name)
        if loaded != expected:
            raise TunerError(f"{spec.path}: only {loaded} of {expected} LoRA modules matched "
                             "layers of the base model; was it trained on another base model?")


def _load_lora_file(pipe, file: Path, spec: LoraSpec) -> None:
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=spec.name)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TunerError(f"{spec.path}: diffusers could not load this adapter into the base "
                         f"model ({first}); is it for this model family?") from None


def kohya_file_as_diffusers(pipe, family, kohya: dict, folder: Path) -> Path:
    """A kohya file whose modules have different alphas or ranks, converted by us (per-module
    scales kept exactly) into a diffusers file that diffusers loads right."""
    from tuner.adapters import WEIGHT_NAME
    from tuner.export import kohya_names, kohya_to_diffusers

    comps = family.components_from_pipeline(pipe, identity="")
    layers, configs = kohya_to_diffusers(kohya, kohya_names(family, comps))
    family.save_lora(folder, layers, configs, WEIGHT_NAME)
    return folder / WEIGHT_NAME


def count_lora_layers(pipe, adapter_name: str) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(1 for module in pipeline_modules(pipe) for layer in module.modules()
               if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A)


def activate(pipe, choice: AdapterChoice) -> None:
    if choice.loras:
        pipe.set_adapters([s.name for s in choice.loras],
                          adapter_weights=[s.scale for s in choice.loras])


def render_cells(pipe, cells: list[Cell], choices: dict[str, AdapterChoice], *,
                 batch_size: int = 4, **settings) -> None:
    """Fill every cell's image; cells with the same adapters and scale share pipeline calls.
    A cell's scale multiplies the weight of each of its adapters (0 = the base model)."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.adapter, cell.scale), []).append(cell)
    for (adapter, _), group in groups.items():
        activate(pipe, choices[adapter])
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            for cell, image in zip(chunk, render_batch(pipe, chunk, **settings), strict=True):
                cell.image = image


# --- grids -------------------------------------------------------------------------------

AXES = ("prompt", "seed", "scale", "step", "adapter")
MIN_CELL = 192  # cells are upscaled (nearest) to at least this, so labels fit and pixels show
GAP = 4


def grid_cells(prompts: list[str], seeds: list[int], scales: list[float],
               choices: dict[str, AdapterChoice]) -> list[Cell]:
    return [Cell(prompt, seed, scale, choice.step, label) for label, choice in choices.items()
            for prompt in prompts for seed in seeds for scale in scales]


def check_axes(cells: list[Cell], rows: tuple[str, ...], cols: tuple[str, ...]) -> None:
    for axis in rows + cols:
        if axis not in AXES:
            raise TunerError(f"grid axis {axis!r}: choose from {', '.join(AXES)}")
    if set(rows) & set(cols):
        raise TunerError(f"grid axes {sorted(set(rows) & set(cols))} are in both rows and cols")
    for axis in AXES:
        values = {getattr(cell, axis) for cell in cells}
        if len(values) > 1 and axis not in rows + cols:
            raise TunerError(f"grid: {axis} has {len(values)} values but is in neither --rows "
                             f"nor --cols; add it to one of them")


def label_lines(cell: Cell, axes: tuple[str, ...]) -> list[str]:
    lines = []
    for axis in axes:
        value = getattr(cell, axis)
        lines.append(f"{axis} {value:g}" if axis == "scale" else
                     f"{axis} {value}" if axis in ("seed", "step") else str(value))
    return lines


def make_grid(cells: list[Cell], rows: tuple[str, ...], cols: tuple[str, ...],
              min_cell: int = MIN_CELL):
    """Lay out cells by their row and column keys; above each image, a band with one label
    line per axis. Returns (sheet, index); the index gives every cell's box and settings."""
    row_keys = list(dict.fromkeys(tuple(getattr(c, a) for a in rows) for c in cells))
    col_keys = list(dict.fromkeys(tuple(getattr(c, a) for a in cols) for c in cells))
    small_w, small_h = cells[0].image.size
    factor = max(1, math.ceil(min_cell / min(small_w, small_h)))
    width, height = small_w * factor, small_h * factor
    font = _font(max(11, width // 16))
    line_h = font.getbbox("Ag|")[3] + 3
    axes = rows + cols
    label_h = line_h * len(axes) + 4
    pitch_x, pitch_y = width + GAP, label_h + height + GAP
    sheet = Image.new("RGB", (pitch_x * len(col_keys) - GAP, pitch_y * len(row_keys) - GAP),
                      "white")
    draw = ImageDraw.Draw(sheet)
    index = []
    for cell in cells:
        r = row_keys.index(tuple(getattr(cell, a) for a in rows))
        c = col_keys.index(tuple(getattr(cell, a) for a in cols))
        x, y = c * pitch_x, r * pitch_y
        lines = label_lines(cell, axes)
        for i, line in enumerate(lines):
            draw.text((x + 3, y + 2 + i * line_h), _fit(draw, line, font, width - 6),
                      fill="black", font=font)
        image = cell.image.convert("RGB")
        if factor > 1:
            image = image.resize((width, height), Image.NEAREST)
        sheet.paste(image, (x, y + label_h))
        index.append({"row": r, "col": c, "label": " | ".join(lines), "lines": lines,
                      "box": [x, y + label_h, width, height], "label_box": [x, y, width, label_h],
                      **cell.settings()})
    meta = {"rows": list(rows), "cols": list(cols), "n_rows": len(row_keys),
            "n_cols": len(col_keys), "cell_width": width, "cell_height": height,
            "label_height": label_h, "upscale": factor, "gap": GAP, "cells": index}
    return sheet, meta


def save_grid(sheet: Image.Image, meta: dict, path: Path) -> Path:
    """The grid PNG and, beside it, the JSON index of every cell (same name, .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "image": path.name}
    sheet.save(path, pnginfo=png_info({"grid": meta["rows"] + meta["cols"],
                                       "index": path.with_suffix(".json").name}))
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
