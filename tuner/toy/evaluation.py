"""`tuner eval OUTPUT_DIR`: judge a trained adapter on the toy world.

Reads the run's recipe.yaml (base model, sampling settings, training captions, dreambooth
section) and its adapter, renders every prompt group with the base model and with the adapter,
lets the toy judge label the samples and reports the metrics of tuner.toy.metrics (optionally
CLIP/DINO scores from local weights). Writes OUTPUT_DIR/eval/eval.json and eval/grid.png.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from tuner.errors import TunerError
from tuner.inference.render import SCHEDULER_NAMES
from tuner.toy import world
from tuner.toy.metrics import GROUPS, METRICS, Sample, find_target, plan_samples, score

log = logging.getLogger("tuner")
JUDGED_FAMILIES = ("sd15", "sd2")  # the toy base model is an SD 1.x pipeline
MAX_REFERENCES = 64  # training images compared by CLIP-I/DINO (all pairs: keep it bounded)
SHEET_CELL = 96


@dataclass
class EvalOptions:
    n: int = 8
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None  # None: the recipe's sample settings
    guidance: float | None = None
    scheduler: str | None = None
    scale: float = 1.0
    device: str | None = None
    batch_size: int = 16
    force: bool = False
    judge: str | None = None
    clip: str | None = None
    dino: str | None = None
    adapter: str | None = None  # another adapter file of the run (its EMA, best/)


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="judge a trained adapter on the toy world: tuner eval OUTPUT_DIR [--json]",
    )
    p.add_argument("output_dir", help="a training run's output.dir (recipe.yaml + adapter)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--n", type=int, default=8, help="prompts per group (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds (default 0)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the recipe's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the recipe's)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="default: the recipe's")
    p.add_argument("--scale", type=float, default=1.0, help="adapter weight (default 1)")
    p.add_argument("--clip", metavar="PATH", help="local CLIP folder: CLIP-T and CLIP-I")
    p.add_argument("--dino", metavar="PATH", help="local DINO/DINOv2 folder: DINO score")
    p.add_argument(
        "--adapter",
        metavar="FILE",
        help="judge this adapter file with the run's recipe (e.g. pytorch_lora_weights_ema"
        ".safetensors, best/pytorch_lora_weights.safetensors); default: the run's adapter",
    )
    p.add_argument("--judge", metavar="PATH", help="judge weights (default: the committed ones)")
    p.add_argument("--force", action="store_true", help="judge a base outside the toy world")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    if args.n < 1:
        raise TunerError(f"--n {args.n}: give at least 1 prompt per group")
    options = EvalOptions(
        n=args.n,
        seeds=list(args.seeds),
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        scale=args.scale,
        device=args.device,
        batch_size=args.batch_size,
        force=args.force,
        judge=args.judge,
        clip=args.clip,
        dino=args.dino,
        adapter=args.adapter,
    )
    report = run_eval(Path(args.output_dir), options)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary(report))
    return 0


def run_eval(output_dir: Path, options: EvalOptions) -> dict:
    """Render, judge and score; writes eval/eval.json and eval/grid.png; returns the report."""
    from tuner import files

    recipe, adapter = load_run(output_dir)
    if options.adapter:
        from tuner.inference.pipelines import adapter_file

        adapter = adapter_file(options.adapter)
    family = check_judgeable(recipe, options.force)
    judge = open_judge(options.judge)
    items = training_items(recipe)
    target = find_target(recipe, items)
    samples = plan_samples(target, options.n, options.seeds)
    settings = render_samples(samples, recipe, family, adapter, options)
    for sample, labels in zip(samples, judge.predict([s.image for s in samples]), strict=True):
        sample.labels = labels
    report = score(samples, target)
    if options.clip or options.dino:
        report.update(embed(samples, items, options))
    report["details"]["settings"] = {
        **settings,
        "adapter": str(adapter),
        "n": options.n,
        "seeds": options.seeds,
        "judge": str(options.judge or "committed"),
    }
    folder = output_dir / ("eval" if not options.adapter else f"eval-{adapter.stem}")
    folder.mkdir(exist_ok=True)
    eval_sheet(samples, options.scale).save(folder / "grid.png")
    report["details"]["grid"] = f"{folder.name}/grid.png"
    files.write_text(folder / "eval.json", json.dumps(report, indent=2) + "\n")
    return report


def load_run(output_dir: Path):
    from tuner.inference.pipelines import adapter_file
    from tuner.recipe import load_recipe

    if not (output_dir / "recipe.yaml").is_file():
        raise TunerError(
            f"{output_dir}: no recipe.yaml; point tuner eval at a training run's output.dir"
        )
    return load_recipe(output_dir / "recipe.yaml"), adapter_file(output_dir)


def check_judgeable(recipe, force: bool):
    """The judge reads only 64x64 toy-world images: refuse other bases unless --force."""
    from tuner import families

    family = families.for_model(recipe.model)
    size = (recipe.sample.width or recipe.data.resolution,
            recipe.sample.height or recipe.data.resolution)  # fmt: skip
    if force:
        return family
    if family.spec.name not in JUDGED_FAMILIES:
        raise TunerError(
            f"{recipe.model.path}: a {family.spec.name} base; the toy judge only reads the "
            "SD-family toy world (builtin:toy and adapters on it); pass --force to judge it anyway"
        )
    if size != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        raise TunerError(
            f"samples are {size[0]}x{size[1]}; the toy judge only reads the "
            f"{world.IMAGE_SIZE}x{world.IMAGE_SIZE} toy world; train at data.resolution "
            f"{world.IMAGE_SIZE}, or pass --force to judge resized samples anyway"
        )
    return family


def open_judge(path: str | None):
    from tuner.toy.judge import load_judge

    try:
        return load_judge(path)
    except (FileNotFoundError, ValueError) as exc:
        raise TunerError(f"judge: {exc}") from exc


def training_items(recipe) -> list:
    """The run's distinct training images with their captions as trained, read by the same
    data pipeline that trained them (repeats collapsed)."""
    from tuner.data.items import collect_items
    from tuner.training.dreambooth import instance_sources

    items, _ = collect_items(recipe.data, instance_sources(recipe))
    return list({item.record.key: item for item in items}.values())


def render_samples(samples: list[Sample], recipe, family, adapter: Path, options) -> dict:
    """Fill every sample's image: base and adapter from one pipeline, the adapter loaded by
    diffusers' load_lora_weights and weighted per cell (0 = the base model exactly)."""
    from tuner.inference.pipelines import AdapterChoice, LoraSpec, load_adapters, render_cells
    from tuner.inference.render import Cell, pipeline_default, set_scheduler

    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The recipe's whole model section (VAE override, variant, ...), as training loaded it,
    # but a full-precision base: fp8 is a training-memory setting, the adapter loads into bf16.
    model = recipe.model
    if model.quantize == "fp8":
        model = model.model_copy(update={"quantize": "none"})
    pipe = family.build_pipeline(family.load(model, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    spec = LoraSpec(adapter, options.scale, "evaluated", "adapter")
    load_adapters(pipe, family, [spec])
    scheduler = options.scheduler or recipe.sample.scheduler
    set_scheduler(pipe, scheduler)
    sample = recipe.sample
    settings = {
        "model": recipe.model.path,
        "family": family.spec.name,
        "scale": options.scale,
        "steps": options.steps or sample.steps,
        "guidance": sample.guidance if options.guidance is None else options.guidance,
        "scheduler": scheduler,
        "negative_prompt": sample.negative_prompt,
        "width": sample.width or recipe.data.resolution,
        "height": sample.height or recipe.data.resolution,
    }
    if settings["guidance"] is None:
        settings["guidance"] = pipeline_default(pipe, "guidance_scale")
    cells = [Cell(s.prompt, s.seed, float(s.adapter), adapter="adapter") for s in samples]
    log.info("eval: rendering %d samples on %s", len(cells), device)
    render_cells(
        pipe,
        cells,
        {"adapter": AdapterChoice("adapter", [spec])},
        batch_size=options.batch_size,
        device=device,
        **{k: settings[k] for k in ("steps", "guidance", "negative_prompt", "width", "height")},
    )
    for s, cell in zip(samples, cells, strict=True):
        s.image = cell.image
    return settings


def embed(samples: list[Sample], items: list, options) -> dict:
    """CLIP/DINO over the adapter's samples of the trained groups (all groups if none)."""
    from tuner.data.images import BadImage, load_image
    from tuner.inference.scoring import embed_scores

    adapted = [s for s in samples if s.adapter]
    trained = [s for s in adapted if s.group in ("style", "subject")] or adapted
    references = []
    for item in items[:MAX_REFERENCES]:
        try:
            references.append(load_image(item.record.image))
        except BadImage as exc:  # training skipped it too
            log.warning("CLIP-I/DINO: skipping %s", exc)
    return embed_scores(
        [s.image for s in trained],
        [s.prompt for s in trained],
        references,
        clip=options.clip,
        dino=options.dino,
    )


def eval_sheet(samples: list[Sample], scale: float) -> Image.Image:
    """One block per prompt group (titled): the base model's row above the adapter's, a column
    per prompt and seed."""
    from tuner.inference.grids import make_grid
    from tuner.inference.render import Cell

    blocks = []
    rows = {False: "base model", True: f"adapter at {scale:g}"}
    for group in GROUPS:
        cells = [
            Cell(s.prompt, s.seed, adapter=rows[s.adapter], image=s.image)
            for s in samples
            if s.group == group
        ]
        if cells:
            sheet, _ = make_grid(cells, ("adapter",), ("prompt", "seed"), min_cell=SHEET_CELL)
            blocks.append((f"{group} prompts", sheet))
    title_h = 20
    width = max(sheet.width for _, sheet in blocks)
    height = sum(title_h + sheet.height + 8 for _, sheet in blocks)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, sheet in blocks:
        draw.text((4, y + 4), title, fill="black")
        canvas.paste(sheet, (0, y + title_h))
        y += title_h + sheet.height + 8
    return canvas


def summary(report: dict) -> str:
    lines = []
    details = report["details"]
    for metric in METRICS:
        value, detail = report[metric], details.get(metric, {})
        if value is None:
            lines.append(f"{metric:<20} n/a")
            continue
        base = detail.get("base")
        lines.append(
            f"{metric:<20} {value:.3f}  ({detail['matched']}/{detail['total']}"
            + (f"; base model {base:.3f}" if base is not None else "")
            + ")"
        )
    for metric in ("clip_t", "clip_i", "dino"):
        if report[metric] is not None:
            lines.append(f"{metric:<20} {report[metric]:.4f}")
    target = details["target"]
    lines.append(
        f"target: style {target['style']}, subject {target['subject']}, "
        f"class {target['class_shape']}; grid and eval.json in "
        f"{Path(details['settings']['adapter']).parent / 'eval'}"
    )
    return "\n".join(lines)
