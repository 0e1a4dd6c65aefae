"""`tuner grid`: labelled evaluation sheets with a JSON index, over prompts, seeds, adapter scales
and adapters, or one column per saved checkpoint of a training run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tuner.cli.sample import (
    Settings,
    add_render_flags,
    attach_controls,
    base_model,
    quiet_progress,
    read_prompts,
    render,
    settings_from,
)
from tuner.errors import TunerError
from tuner.inference.grids import check_axes, make_grid, save_grid
from tuner.inference.pipelines import AdapterChoice, LoraSpec, grid_cells, lora_specs


def register(sub) -> None:
    g = sub.add_parser(
        "grid",
        help="labelled grid + JSON index: tuner grid MODEL --lora A "
        "--scales 0,1 ... or tuner grid --checkpoints OUTPUT_DIR",
    )
    g.add_argument(
        "model",
        nargs="?",
        help="base model (default: the recipe's with "
        "--checkpoints, else the one named in the first --lora's metadata)",
    )
    g.add_argument(
        "--checkpoints",
        metavar="OUTPUT_DIR",
        help="one column per saved checkpoint of this training output, then the final",
    )
    add_render_flags(g)
    g.add_argument("--scales", help="adapter scales, comma separated, e.g. 0,0.5,1")
    g.add_argument("--rows", help="axes from prompt,seed,scale,step,adapter (default prompt,seed)")
    g.add_argument(
        "--cols",
        help="axes for columns (default: step with --checkpoints, else "
        "scale, and adapter when several --lora)",
    )
    g.add_argument(
        "--out",
        help="grid PNG (default grid.png; with --checkpoints OUTPUT_DIR/samples/checkpoints.png)",
    )
    g.set_defaults(func=cmd_grid)


def cmd_grid(args) -> int:
    quiet_progress(args)
    if args.checkpoints:
        output_dir = Path(args.checkpoints)
        settings, prompts, seeds = recipe_settings(output_dir, args)
        choices = checkpoint_choices(output_dir)
        default_cols, default_scales = "step", [1.0]
        out = Path(args.out) if args.out else output_dir / "samples" / "checkpoints.png"
    else:
        specs = lora_specs(args.lora)
        model, family = base_model(args, specs)
        settings = settings_from(args, model, family)
        prompts, seeds = read_prompts(args), args.seed or [0]
        several = len(specs) > 1
        default_cols = "adapter,scale" if several else "scale"
        default_scales = [0.0, 1.0] if specs else [1.0]
        cols_text = args.cols or default_cols
        choices = adapter_choices(
            specs, each_alone="adapter" in axes(args.rows or "") + axes(cols_text)
        )
        out = Path(args.out or "grid.png")
    if not prompts:
        raise TunerError("grid: no prompt; give --prompt TEXT or --prompt-file FILE")
    scales = parse_scales(args.scales) if args.scales else default_scales
    rows, cols = axes(args.rows or "prompt,seed"), axes(args.cols or default_cols)
    cells = grid_cells(prompts, seeds, scales, choices)
    attach_controls(cells, prompts, args.control)
    check_axes(cells, rows, cols)
    settings = render(settings, cells, choices, args)
    sheet, meta = make_grid(cells, rows, cols)
    meta["settings"] = asdict(settings)
    meta["adapters"] = {
        label: [{"path": str(s.path), "scale": s.scale} for s in choice.loras]
        for label, choice in choices.items()
    }
    save_grid(sheet, meta, out)
    print(
        f"grid: {out} ({meta['n_rows']} rows x {meta['n_cols']} cols), index "
        f"{out.with_suffix('.json')}"
    )
    return 0


def axes(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_scales(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise TunerError(
            f"--scales {text!r}: expected numbers separated by commas, e.g. 0,0.5,1"
        ) from exc


def adapter_choices(specs: list[LoraSpec], each_alone: bool) -> dict[str, AdapterChoice]:
    """One column per adapter (the `adapter` axis), or all adapters together."""
    if each_alone:
        return {s.label: AdapterChoice(s.label, [s]) for s in specs}
    label = " + ".join(f"{s.label}:{s.scale:g}" for s in specs) or "base"
    return {label: AdapterChoice(label, specs)}


def recipe_settings(output_dir: Path, args) -> tuple[Settings, list[str], list[int]]:
    """Base model, prompts, seeds and sampler settings from OUTPUT_DIR/recipe.yaml; flags win."""
    from tuner.recipe import load_recipe

    if not (output_dir / "recipe.yaml").is_file():
        raise TunerError(
            f"--checkpoints {output_dir}: no recipe.yaml there; point it at a training output.dir"
        )
    recipe = load_recipe(output_dir / "recipe.yaml")
    sample = recipe.sample
    settings = Settings(
        model=args.model or recipe.model.path,
        family=args.family or recipe.model.family,
        negative_prompt=sample.negative_prompt if args.negative is None else args.negative,
        steps=args.steps or sample.steps,
        guidance=sample.guidance if args.guidance is None else args.guidance,
        width=args.width or sample.width or recipe.data.resolution,
        height=args.height or sample.height or recipe.data.resolution,
        scheduler=args.scheduler or sample.scheduler,
    )
    prompts = read_prompts(args) or list(sample.prompts)
    return settings, prompts, args.seed or list(sample.seeds)


def checkpoint_choices(output_dir: Path) -> dict[str, AdapterChoice]:
    """One adapter per saved checkpoint, oldest first, then the final adapter. A checkpoint
    saved at the final step holds the same weights as the final adapter, so it is left out."""
    from tuner.adapters.lora import WEIGHT_NAME
    from tuner.inference.pipelines import adapter_file
    from tuner.training.checkpoint import STEP_DIR, complete_checkpoints

    found: dict[int | None, tuple[str, Path]] = {}
    for folder in complete_checkpoints(output_dir):
        if (folder / WEIGHT_NAME).is_file():
            found[int(STEP_DIR.match(folder.name).group(1))] = (folder.name, folder / WEIGHT_NAME)
    try:
        final = adapter_file(output_dir)
    except TunerError:
        final = None
    if final is not None:
        step = final_step(output_dir, final)
        found.pop(step, None)
        found[step] = ("final", final)
    if not found:
        raise TunerError(
            f"--checkpoints {output_dir}: no checkpoints/step-*/{WEIGHT_NAME} and "
            "no final adapter; train with output.save_every > 0"
        )
    choices = {}
    for i, (step, (label, path)) in enumerate(found.items()):
        choices[label] = AdapterChoice(label, [LoraSpec(path, 1.0, f"ckpt{i}", label)], step)
    return choices


def final_step(output_dir: Path, adapter: Path) -> int | None:
    from tuner.adapters.formats import read_adapter
    from tuner.training.outputs import FINISHED

    if (output_dir / FINISHED).is_file():
        return json.loads((output_dir / FINISHED).read_text()).get("steps")
    steps = read_adapter(adapter)[1].get("ss_steps")
    return int(steps) if steps else None
