"""`tuner sample`: PNGs with their settings inside, and the render path `tuner grid`
(tuner.cli.grid) shares: flags, settings, base-model lookup, controls."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tuner.errors import TunerError
from tuner.families import names as family_names
from tuner.inference.pipelines import AdapterChoice, LoraSpec, grid_cells, lora_specs, render_cells
from tuner.inference.render import SCHEDULER_NAMES, pipeline_default, png_info

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Settings:
    """What a render needs besides prompts, seeds and adapters; None = the pipeline's default."""

    model: str
    family: str | None = None
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str = "default"


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="render PNGs: tuner sample MODEL --lora PATH[:SCALE] --prompt TEXT --seed N --out DIR",
    )
    p.add_argument(
        "model",
        nargs="?",
        help="diffusers folder, .safetensors file, hub id or "
        "builtin:NAME (default: the base model named in the first --lora's metadata)",
    )
    add_render_flags(p)
    p.add_argument("--out", default="samples", help="folder for the PNGs (default: samples)")
    p.set_defaults(func=cmd_sample)


def add_render_flags(p) -> None:
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="output dir or .safetensors (diffusers or kohya); repeatable",
    )
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="IMAGE",
        help="editing families: the reference image to edit; one for all prompts, or one "
        "per prompt (repeatable)",
    )
    p.add_argument("--seed", action="append", type=int, help="repeatable (default 0)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--steps", type=int, help="inference steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    p.add_argument("--family", choices=family_names(), help="model family, if not detected")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")


def quiet_progress(args) -> None:
    """Loading bars from transformers/diffusers bury the one line the user needs."""
    if getattr(args, "debug", False):
        return
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


# --- tuner sample ----------------------------------------------------------------------------


def settings_from(args, model: str, family) -> Settings:
    return Settings(
        model,
        family,
        args.negative or "",
        args.steps,
        args.guidance,
        args.width,
        args.height,
        args.scheduler or "default",
    )


def cmd_sample(args) -> int:
    quiet_progress(args)
    prompts = read_prompts(args)
    if not prompts:
        raise TunerError("no prompt; give --prompt TEXT (repeatable) or --prompt-file FILE")
    specs = lora_specs(args.lora)
    model, family = base_model(args, specs)
    settings = settings_from(args, model, family)
    label = " + ".join(f"{s.label}:{s.scale:g}" for s in specs) or "base"
    choices = {label: AdapterChoice(label, specs)}
    cells = grid_cells(prompts, args.seed or [0], [1.0], choices)
    attach_controls(cells, prompts, args.control)
    settings = render(settings, cells, choices, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        number = prompts.index(cell.prompt)
        path = unused_path(out / f"{number:03d}-seed{cell.seed}-{slug(cell.prompt)}.png")
        meta = image_settings(settings, specs, cell)
        cell.image.save(path, pnginfo=png_info(meta))
    print(f"wrote {len(cells)} images to {out}")
    return 0


def attach_controls(cells, prompts: list[str], controls: list[str]) -> None:
    """--control IMAGE: one for every prompt, or one per prompt in order."""
    if not controls:
        return
    if len(controls) not in (1, len(prompts)):
        raise TunerError(
            f"--control: {len(controls)} images for {len(prompts)} prompts; give one for "
            "all prompts or one per prompt"
        )
    for control in controls:
        if not Path(control).is_file():
            raise TunerError(f"--control {control}: file not found")
    for cell in cells:
        cell.control = controls[0] if len(controls) == 1 else controls[prompts.index(cell.prompt)]


def check_controls(spec, cells) -> None:
    if spec.controls and not all(cell.control for cell in cells):
        raise TunerError(
            f"{spec.name} edits a reference image; give --control IMAGE (one for all prompts "
            "or one per prompt)"
        )
    if not spec.controls and any(cell.control for cell in cells):
        raise TunerError(f"--control: {spec.name} does not take reference images; remove it")


def base_model(args, specs: list[LoraSpec]) -> tuple[str, str | None]:
    """MODEL as given, else the base model our training wrote into the first adapter file."""
    from tuner.adapters.formats import read_adapter

    if args.model:
        return args.model, args.family
    if specs:
        metadata = read_adapter(specs[0].path)[1]
        if metadata.get("tuner_base_model"):
            return metadata["tuner_base_model"], args.family or metadata.get("tuner_family")
    raise TunerError(
        "no base model; give MODEL (a diffusers folder, .safetensors file, hub id "
        "or builtin:NAME), or a --lora file trained by tuner, which names its base"
    )


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        if not path.is_file():
            raise TunerError(f"--prompt-file {path}: file not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def image_settings(settings: Settings, specs: list[LoraSpec], cell) -> dict:
    return {
        **asdict(settings),
        "prompt": cell.prompt,
        "seed": cell.seed,
        "width": cell.image.width,
        "height": cell.image.height,
        "loras": [{"path": str(s.path), "scale": s.scale * cell.scale} for s in specs],
        **({"control": cell.control} if cell.control else {}),
    }


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def unused_path(path: Path) -> Path:
    """Never overwrite an earlier image: add -2, -3, ... to the name."""
    candidate, n = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


# --- shared rendering -------------------------------------------------------------------------


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype != "auto":
        return device, DTYPES[dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def render(settings: Settings, cells, choices: dict[str, AdapterChoice], args) -> Settings:
    """Load the base and every adapter once, render all cells; returns the settings with the
    pipeline's defaults filled in (so metadata records what was used)."""
    from tuner.inference.pipelines import load_adapters, load_base
    from tuner.inference.render import set_scheduler

    device, dtype = device_and_dtype(args.device, args.dtype)
    family, pipe = load_base(settings.model, settings.family, dtype)
    check_controls(family.spec, cells)
    pipe.to(device)
    specs = [spec for choice in choices.values() for spec in choice.loras]
    load_adapters(pipe, family, specs)
    set_scheduler(pipe, settings.scheduler)
    settings.family = family.spec.name
    if settings.steps is None:
        settings.steps = pipeline_default(pipe, "num_inference_steps")
    if settings.guidance is None:
        settings.guidance = pipeline_default(pipe, "guidance_scale")
    render_cells(
        pipe,
        cells,
        choices,
        batch_size=args.batch_size,
        steps=settings.steps,
        guidance=settings.guidance,
        negative_prompt=settings.negative_prompt,
        width=settings.width,
        height=settings.height,
        device=device,
    )
    return settings
