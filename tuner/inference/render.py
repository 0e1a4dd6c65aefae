"""Rendering with diffusers pipelines: cells (prompt, seed, adapter scale), batched calls with one
generator per cell, schedulers by name, and the settings written into each PNG."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
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
    control: str = ""  # editing families: the reference image this cell edits

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
    from peft.tuners.lycoris_utils import LycorisLayer

    saved = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (LoraLayer, LycorisLayer)):
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
def render_batch(
    pipe,
    cells: list[Cell],
    *,
    steps: int,
    guidance: float | None,
    negative_prompt: str = "",
    width: int | None,
    height: int | None,
    device,
    max_sequence_length: int | None = None,
) -> list[Image.Image]:
    """One pipeline call for cells sharing a scale; one generator per cell, so each image is
    the same as rendering it alone. None settings keep the pipeline's defaults;
    max_sequence_length: the text length training encoded (T5 prompts are padded to it and
    the Flux-style transformers see the padding), where the pipeline takes one."""
    generators = [torch.Generator(device).manual_seed(cell.seed) for cell in cells]
    kwargs = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "width": width,
        "height": height,
        "generator": generators,
        "output_type": "pil",
    }
    if max_sequence_length and pipeline_default(pipe, "max_sequence_length") is not None:
        kwargs["max_sequence_length"] = max_sequence_length
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if width and height and pipeline_default(pipe, "max_area") is not None:
        # FluxKontextPipeline rescales width x height to max_area (1024^2) unless told
        kwargs["max_area"] = width * height
    if negative_prompt:
        kwargs["negative_prompt"] = [negative_prompt] * len(cells)
    if cells[0].control and len(cells) > 1 and not sizes_references_to_output(pipe):
        # Qwen-Image-Edit encodes the reference with the prompt: a batch would pad the VL
        # encoder's inputs (Edit Plus refuses batches), so each cell is its own call.
        settings = dict(steps=steps, guidance=guidance, negative_prompt=negative_prompt)
        settings.update(width=width, height=height, device=device)
        settings.update(max_sequence_length=max_sequence_length)
        return [render_batch(pipe, [cell], **settings)[0] for cell in cells]
    if cells[0].control:
        kwargs.update(control_arguments(pipe, cells, width, height))
    with lora_scale(pipeline_modules(pipe), cells[0].scale):
        # prompt by name: editing pipelines take the reference image first
        return pipe(prompt=[cell.prompt for cell in cells], **kwargs).images


def load_control(path: str, width: int | None, height: int | None) -> Image.Image:
    """A reference image at the output size: training sees each reference at its target's
    size, so sampling gives it at the size the edit is rendered at."""
    from tuner.data.images import BadImage, load_image

    try:
        image = load_image(path)
    except BadImage as exc:
        raise TunerError(f"control image {path}: unreadable ({exc.reason})") from exc
    if width and height and image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def sizes_references_to_output(pipe) -> bool:
    """FluxKontextPipeline takes the reference at the output size when told not to resize it
    (`_auto_resize`); the Qwen-Image-Edit pipelines resize every reference to ~1024^2 at its
    own aspect ratio themselves, as training does (FamilySpec.reference_area)."""
    return pipeline_default(pipe, "_auto_resize") is not None


def control_arguments(pipe, cells: list[Cell], width, height) -> dict:
    """The reference images of a batch, as the editing pipeline takes them."""
    if not sizes_references_to_output(pipe):
        return {"image": [load_control(cell.control, None, None) for cell in cells]}
    # FluxKontextPipeline would resize the reference to one of Kontext's preferred sizes; it
    # trained at its target's size, so it gets that.
    images = [load_control(cell.control, width, height) for cell in cells]
    return {"image": images, "_auto_resize": False}


def png_info(settings: dict) -> PngInfo:
    """Our settings as JSON under `tuner`; single images also get an A1111-style `parameters`."""
    info = PngInfo()
    info.add_text("tuner", json.dumps(settings))
    if "prompt" in settings:
        info.add_text("parameters", a1111_parameters(settings))
    return info


def a1111_parameters(s: dict) -> str:
    loras = " ".join(
        f"<lora:{Path(lora['path']).stem}:{lora['scale'] * s.get('scale', 1):g}>"
        for lora in s.get("loras", [])
    )
    lines = [f"{s['prompt']} {loras}".strip()]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = {
        "Steps": s.get("steps"),
        "Sampler": s.get("scheduler"),
        "CFG scale": s.get("guidance"),
        "Seed": s.get("seed"),
        "Size": f"{s.get('width')}x{s.get('height')}",
        "Model": s.get("model"),
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)
