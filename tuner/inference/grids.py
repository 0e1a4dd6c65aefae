"""Labelled grids of rendered cells with a JSON index, and the training-time sample grid."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tuner import files
from tuner.devices import on_device
from tuner.errors import TunerError
from tuner.families import text_encoders
from tuner.inference.render import (
    Cell,
    png_info,
    render_batch,
    set_scheduler,
    sizes_references_to_output,
)

AXES = ("prompt", "seed", "scale", "step", "adapter")
MIN_CELL = 192  # cells are upscaled (nearest) to at least this, so labels fit and pixels show
GAP = 4
log = logging.getLogger("tuner")


def check_axes(cells: list[Cell], rows: tuple[str, ...], cols: tuple[str, ...]) -> None:
    """Known axes, none in both rows and cols, and one cell per place (an axis that varies may
    stay off the grid only when the chosen axes determine it, e.g. adapter by step)."""
    for axis in rows + cols:
        if axis not in AXES:
            raise TunerError(f"grid axis {axis!r}: choose from {', '.join(AXES)}")
    if set(rows) & set(cols):
        raise TunerError(f"grid axes {sorted(set(rows) & set(cols))} are in both rows and cols")
    places = {tuple(getattr(cell, a) for a in rows + cols) for cell in cells}
    if len(places) < len(cells):
        hidden = [
            a
            for a in AXES
            if a not in rows + cols and len({getattr(cell, a) for cell in cells}) > 1
        ]
        raise TunerError(
            f"grid: {' and '.join(hidden)} {'varies' if len(hidden) == 1 else 'vary'}"
            " but is in neither --rows nor --cols; add it to one of them"
        )


def label_lines(cell: Cell, axes: tuple[str, ...]) -> list[str]:
    lines = []
    for axis in axes:
        value = getattr(cell, axis)
        if axis == "control":  # a reference image: its file name
            lines.append(Path(value).name)
            continue
        lines.append(
            f"{axis} {value:g}"
            if axis == "scale"
            else f"{axis} {value}"
            if axis in ("seed", "step")
            else str(value)
        )
    return lines


def make_grid(
    cells: list[Cell], rows: tuple[str, ...], cols: tuple[str, ...], min_cell: int = MIN_CELL
):
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
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    drawn = [
        [part for line in label_lines(cell, axes) for part in _wrap(measure, line, font, width - 6)]
        for cell in cells
    ]
    label_h = line_h * max(len(parts) for parts in drawn) + 4
    pitch_x, pitch_y = width + GAP, label_h + height + GAP
    sheet = Image.new(
        "RGB", (pitch_x * len(col_keys) - GAP, pitch_y * len(row_keys) - GAP), "white"
    )
    draw = ImageDraw.Draw(sheet)
    index = []
    for cell, parts in zip(cells, drawn, strict=True):
        r = row_keys.index(tuple(getattr(cell, a) for a in rows))
        c = col_keys.index(tuple(getattr(cell, a) for a in cols))
        x, y = c * pitch_x, r * pitch_y
        lines = label_lines(cell, axes)
        for i, part in enumerate(parts):
            draw.text((x + 3, y + 2 + i * line_h), part, fill="black", font=font)
        image = cell.image.convert("RGB")
        if factor > 1:
            image = image.resize((width, height), Image.NEAREST)
        sheet.paste(image, (x, y + label_h))
        index.append(
            {
                "row": r,
                "col": c,
                "label": " | ".join(lines),
                "lines": lines,
                "box": [x, y + label_h, width, height],
                "label_box": [x, y, width, label_h],
                **cell.settings(),
            }
        )
    meta = {
        "rows": list(rows),
        "cols": list(cols),
        "n_rows": len(row_keys),
        "n_cols": len(col_keys),
        "cell_width": width,
        "cell_height": height,
        "label_height": label_h,
        "upscale": factor,
        "gap": GAP,
        "cells": index,
    }
    return sheet, meta


def save_grid(sheet: Image.Image, meta: dict, path: Path) -> Path:
    """The grid PNG and, beside it, the JSON index of every cell (same name, .json)."""
    path = Path(path)
    meta = {**meta, "image": path.name}
    files.save_image(
        sheet,
        path,
        format="PNG",
        pnginfo=png_info(
            {"grid": meta["rows"] + meta["cols"], "index": path.with_suffix(".json").name}
        ),
    )
    files.write_json(path.with_suffix(".json"), meta)
    return path


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """Greedy word wrap into at most max_lines; the last line is cut with an ellipsis."""
    lines: list[str] = []
    words = text.split(" ")
    while words and len(lines) < max_lines - 1:
        take = len(words)
        while take > 1 and draw.textlength(" ".join(words[:take]), font=font) > width:
            take -= 1
        lines.append(_fit(draw, " ".join(words[:take]), font, width))
        words = words[take:]
    if words:
        lines.append(_fit(draw, " ".join(words), font, width))
    return lines or [""]


def _fit(draw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


# --- during training ------------------------------------------------------------------------


GRID_BATCH = 4


def training_grid(
    recipe, output_dir: Path, family, comps, step: int, accelerator, ema=None
) -> Path | None:
    """Grid of the recipe's fixed prompts x seeds (rows) x adapter scales (columns); with
    train.ema, the average's own columns beside them (adapter "ema", every scale but 0); for
    an editing family each row starts with its reference image: reference | base edit | LoRA."""
    sample = recipe.sample
    if not sample.prompts:
        return None
    device = accelerator.device
    size = recipe.data.resolution
    pipe = grid_pipeline(recipe, family, comps)
    cells, averaged = grid_cells(recipe, step, ema)
    was_training = comps.denoiser.training
    comps.denoiser.eval()
    visiting = [comps.vae, *comps.text_encoders.values()]
    if text_encoders.keep_off_device(comps):
        # Quantized/offloaded encoders never join the denoiser on the device: the prompts
        # were encoded in the caching phase (pre_encode_sample_prompts).
        text_encoders.use_encoded_prompts(pipe, comps, device)
        visiting = [comps.vae]
    # The encoders visit the device for this phase only (their outputs are cached).
    with on_device(visiting, device):
        render_calls(cell_calls(pipe, cells, recipe, device))
        if averaged:
            with ema.swapped_in():
                render_calls(cell_calls(pipe, averaged, recipe, device))
    comps.denoiser.train(was_training)
    cells = cells + averaged
    rows, columns = ("prompt", "seed"), ("adapter", "scale") if averaged else ("scale",)
    if sample.controls:
        cells = with_references(cells, sample.width or size, sample.height or size)
        rows, columns = ("prompt", "control", "seed"), ("adapter",)  # reference | base | LoRA
    sheet, meta = make_grid(cells, rows, columns)
    path = save_grid(sheet, meta, Path(output_dir) / "samples" / f"step-{step:06d}.png")
    _log_images(accelerator, sheet, step)
    return path


def grid_pipeline(recipe, family, comps):
    pipe = family.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, recipe.sample.scheduler)
    return pipe


def grid_cells(recipe, step: int, ema) -> tuple[list[Cell], list[Cell]]:
    """The grid's cells, and the EMA adapter's (none without train.ema)."""
    sample = recipe.sample
    controls = sample.controls or [""] * len(sample.prompts)
    places = [
        (p, control, seed, scale)
        for p, control in zip(sample.prompts, controls, strict=True)
        for seed in sample.seeds
        for scale in sample.scales
    ]
    cells = [
        Cell(p, seed, scale, step, adapter_label(scale, ema, control), control=control)
        for p, control, seed, scale in places
    ]
    averaged = [
        Cell(p, seed, scale, step, f"EMA edit x{scale:g}" if control else "ema", control=control)
        for p, control, seed, scale in places
        if ema is not None and scale != 0
    ]
    return cells, averaged


def adapter_label(scale: float, ema, control: str = "") -> str:
    """Editing grids label every column (base edit, LoRA edit); with an EMA column the adapter
    axis is labelled base (scale 0), raw, ema."""
    if control:
        return edit_label(scale)
    if ema is None:
        return ""
    return "base" if scale == 0 else "raw"


def cell_calls(pipe, cells: list[Cell], recipe, device) -> list:
    """(cells, call rendering them) pairs. Cells of one scale share pipeline calls (a few at a
    time, to bound memory); each keeps its own generator, so an image does not depend on its
    batch."""
    sample, size = recipe.sample, recipe.data.resolution
    # Qwen-Image-Edit renders each edit alone (render_batch), so each is its own call: the
    # pre-encoding pass then stops once per cell and keeps every cell's prompt.
    edits_alone = any(cell.control for cell in cells) and not sizes_references_to_output(pipe)
    batch = 1 if edits_alone else GRID_BATCH
    calls = []
    for scale in dict.fromkeys(cell.scale for cell in cells):
        same_scale = [cell for cell in cells if cell.scale == scale]
        for start in range(0, len(same_scale), batch):
            chunk = same_scale[start : start + batch]
            call = functools.partial(
                render_batch,
                pipe,
                chunk,
                steps=sample.steps,
                guidance=sample.guidance,
                negative_prompt=sample.negative_prompt,
                width=sample.width or size,
                height=sample.height or size,
                device=device,
                max_sequence_length=recipe.train.max_sequence_length,
            )
            calls.append((chunk, call))
    return calls


def render_calls(calls) -> None:
    for chunk, call in calls:
        for cell, image in zip(chunk, call(), strict=True):
            cell.image = image


def pre_encode_sample_prompts(recipe, family, comps, device) -> None:
    """With quantized/offloaded encoders: encode every prompt the grids will ask for now, in
    the caching phase, so no grid brings an encoder to the device beside the denoiser (the
    EMA columns ask for the same prompts)."""
    if not recipe.sample.prompts or not text_encoders.keep_off_device(comps):
        return
    pipe = grid_pipeline(recipe, family, comps)
    cells, _ = grid_cells(recipe, 0, None)
    calls = cell_calls(pipe, cells, recipe, device)
    kept = text_encoders.pre_encode(comps, pipe, device, [call for _, call in calls])
    log.info("sample prompts: %d encodings kept for the grids", kept)


def edit_label(scale: float) -> str:
    return "base edit" if scale == 0 else f"LoRA edit x{scale:g}"


def with_references(cells: list[Cell], width: int, height: int) -> list[Cell]:
    """Before each row's edits, a cell showing the reference image it edits."""
    from tuner.inference.render import load_control

    out: list[Cell] = []
    for cell in cells:
        if not any(
            c.adapter == "reference"
            and c.prompt == cell.prompt
            and c.seed == cell.seed
            and c.control == cell.control
            for c in out
        ):
            reference = Cell(
                cell.prompt, cell.seed, 0.0, cell.step, "reference", control=cell.control
            )
            reference.image = load_control(cell.control, width, height)
            out.append(reference)
        out.append(cell)
    return out


def _log_images(accelerator, sheet: Image.Image, step: int) -> None:
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples", np.asarray(sheet), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(sheet)]}, step=step)
