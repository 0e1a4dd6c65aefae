"""The output directory: checked at the start (nothing written), claimed once every check that
can fail before training has passed, filled at the end. A folder belongs to one run, named by
the run id in tuner_run.json and in each of its checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tuner import files
from tuner.adapters import formats, lora
from tuner.adapters.metadata import training_metadata
from tuner.data.captions import tag_frequency
from tuner.errors import TunerError
from tuner.training import changes, checkpoint

log = logging.getLogger("tuner")
FINISHED = "tuner_finished.json"
RUN_FILE = "tuner_run.json"  # {"run_id": ...}: which run the folder (and its checkpoints) is


@dataclass
class OutputPlan:
    """What check_output_dir decided; claim_output_dir carries it out."""

    run_id: str
    resume_from: Path | None = None
    recorded: dict = field(default_factory=dict)  # the resumed checkpoint's tuner_state.json
    replaces: str | None = None  # the line said when a replacing run starts
    stale: list[Path] = field(default_factory=list)  # the replaced run's checkpoints
    notice: str | None = None  # the resumed recipe's legal changes


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else {}


def folder_run_id(output_dir: Path) -> str | None:
    return (read_json(Path(output_dir) / RUN_FILE) or {}).get("run_id")


def check_output_dir(recipe, output_dir: Path, resume_from: Path | None) -> OutputPlan:
    """Every check on output.dir that can fail, before anything in it changes: the folder
    belongs to one run (a fresh run never trains into another run's checkpoints), a resumed
    recipe keeps the checkpoint's adapter, the folder is writable."""
    refuse_dataset_folder(recipe, output_dir)
    finished = read_json(output_dir / FINISHED)
    saved = checkpoint.complete_checkpoints(output_dir)
    plan = OutputPlan(run_id=new_run_id(), resume_from=resume_from)
    if resume_from is not None:
        plan.recorded = checkpoint.read_state(resume_from)
        plan.notice = changes.check_resume(recipe, plan.recorded, resume_from)
        plan.run_id = plan.recorded.get("run_id") or folder_run_id(output_dir) or plan.run_id
    elif finished is not None or saved:
        if finished is not None and not recipe.output.overwrite:
            raise TunerError(
                f"output.dir: {output_dir} holds a finished run; choose another "
                "output.dir, or set output.overwrite=true to replace it"
            )
        last = checkpoint.read_state(saved[-1])["step"] if saved else 0
        if not recipe.output.overwrite:
            raise TunerError(
                f"output.dir: {output_dir} holds an unfinished run (last checkpoint: step "
                f"{last}); resume it with: {recipe.command('train.resume=latest')}; or choose "
                "another output.dir, or set output.overwrite=true to replace it"
            )
        plan.replaces, plan.stale = replacement_line(output_dir, finished, saved, last), saved
    check_writable(output_dir)
    if "kohya" in recipe.output.formats and not kohya_export_possible(recipe):
        log.warning(
            "adapter.dora: the kohya file is skipped (DoRA has no kohya layout); the "
            "diffusers file loads in diffusers and ComfyUI"
        )
    return plan


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def replacement_line(output_dir: Path, finished, saved: list[Path], last: int) -> str:
    run_id = folder_run_id(output_dir)
    what = f"{'finished' if finished is not None else 'unfinished'} run" + (
        f" {run_id}" if run_id else ""
    )
    if finished is not None and "steps" in finished:
        extent = f"{finished['steps']} steps"
    else:
        extent = f"last checkpoint: step {last}"
    line = f"output.overwrite: replacing the {what} in {output_dir} ({extent})"
    if saved:
        line += f"; its {len(saved)} checkpoint{'s are' if len(saved) > 1 else ' is'} deleted"
    return line


def refuse_dataset_folder(recipe, output_dir: Path) -> None:
    """A run's outputs (sample grids) must never become its training data. An output.dir
    inside a dataset folder is skipped when the data is read; one that is the folder is
    refused here."""
    for key, folder in dataset_folders(recipe):
        if os.path.realpath(folder) == os.path.realpath(output_dir):
            raise TunerError(
                f"output.dir: {output_dir} is the folder of {key}; choose an output.dir "
                "outside the dataset"
            )


def dataset_folders(recipe) -> list[tuple[str, str]]:
    folders = [(f"data.datasets[{i}].path", e.path) for i, e in enumerate(recipe.data.datasets)]
    if recipe.dreambooth is not None:
        folders.append(("dreambooth.instance_dir", recipe.dreambooth.instance_dir))
    return [(key, os.path.expanduser(path)) for key, path in folders]


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TunerError(
            f"output.dir: cannot write to {output_dir} ({exc.strerror or exc}); "
            "choose a writable folder"
        ) from exc


def claim_output_dir(recipe, output_dir: Path, plan: OutputPlan) -> None:
    """The run takes the folder, once every check that can fail before training has passed:
    the replaced run's checkpoints and finished marker go, recipe.yaml and tuner_run.json
    are this run's."""
    if plan.replaces:
        log.warning("%s", plan.replaces)
        for old in plan.stale:
            shutil.rmtree(old, ignore_errors=True)
        # The replaced run's best checkpoint and validation curve are not this run's.
        shutil.rmtree(output_dir / "best", ignore_errors=True)
        (output_dir / "validation.json").unlink(missing_ok=True)
    (output_dir / FINISHED).unlink(missing_ok=True)
    files.write_text(output_dir / "recipe.yaml", recipe.to_yaml())
    files.write_json(output_dir / RUN_FILE, {"run_id": plan.run_id})


def kohya_export_possible(recipe) -> bool:
    """DoRA's magnitude vectors have no kohya/webui layout: such runs export diffusers only."""
    return "kohya" in recipe.output.formats and not recipe.adapter.dora


def finish_outputs(
    recipe, output_dir: Path, family, comps, trained, accelerator, steps: int, report, ema=None
) -> None:
    """Final adapter in every requested format (and its average with train.ema), the final
    grid, the model card."""
    # Every file goes through tuner.files: a failed write is one files.WriteError and leaves no
    # partial file; run.py then keeps a checkpoint of the final weights (never lost).
    write_outputs(recipe, output_dir, family, comps, trained, accelerator, steps, report, ema)


def write_outputs(
    recipe, output_dir: Path, family, comps, trained, accelerator, steps: int, report, ema=None
) -> None:
    from tuner.inference.grids import training_grid

    meta = training_metadata(recipe, comps, steps, tag_frequency(report.captions))
    write_adapter_files(recipe, output_dir, family, trained, meta)
    if ema is not None:  # the average, as a second adapter in the same formats
        from tuner.training.ema import EMA_KOHYA_WEIGHT_NAME, EMA_WEIGHT_NAME

        with ema.swapped_in():
            write_adapter_files(
                recipe, output_dir, family, trained, meta, EMA_WEIGHT_NAME, EMA_KOHYA_WEIGHT_NAME
            )
    grid = training_grid(recipe, output_dir, family, comps, steps, accelerator, ema=ema)
    files.write_text(output_dir / "README.md", model_card(recipe, family, steps, grid))
    files.write_json(output_dir / FINISHED, {"steps": steps})
    log.info("adapter saved to %s", output_dir)


def write_adapter_files(
    recipe,
    output_dir: Path,
    family,
    trained,
    meta: dict,
    weight_name: str = lora.WEIGHT_NAME,
    kohya_name: str = lora.KOHYA_WEIGHT_NAME,
) -> None:
    """The trained modules' adapter: the diffusers file and its kohya twin, as output.formats."""
    adapter_file = lora.save_adapter(
        output_dir, family, trained, weight_name=weight_name, extra_metadata=meta
    )
    if kohya_export_possible(recipe):
        if family.spec.export.comfy_layout is not None:
            state, file_meta = formats.read_adapter(adapter_file)
            kohya = family.spec.export.comfy_layout(state, file_meta)
        else:
            # From the trained modules: the trained alpha, whatever the diffusers file folded in.
            kohya = lora.kohya_state(trained, family)
        extra = {}
        if recipe.adapter.type != "lora":  # the LyCORIS file: tuner sample rebuilds peft from it
            from tuner.adapters import lycoris

            configs = {n: lycoris.json_config(m.peft_config["default"]) for n, m in trained.items()}
            extra = lycoris.config_metadata(configs, lycoris.CONFIG_KEY)
        formats.write_safetensors(kohya, output_dir / kohya_name, {**meta, **extra})
    if "diffusers" not in recipe.output.formats:
        adapter_file.unlink()


def load_snippet(recipe, family) -> str:
    if recipe.model.path.startswith("builtin:"):
        # Builtin models are built by tuner, not downloaded: load them through tuner.
        return f'import tuner\npipe = tuner.load_pipeline("{recipe.model.path}")'
    name = family.spec.pipeline
    return f'from diffusers import {name}\npipe = {name}.from_pretrained("{recipe.model.path}")'


def model_card(recipe, family, steps: int, grid: Path | None) -> str:
    triggers = sorted({e.prefix for e in recipe.data.datasets if e.prefix})
    if recipe.dreambooth:
        triggers.append(recipe.dreambooth.instance_prompt)
    grid_line = (
        f"![samples]({grid.relative_to(Path(recipe.output.dir)).as_posix()})"
        if grid
        else "(no sample prompts in the recipe)"
    )
    a, t = recipe.adapter, recipe.train
    return f"""# {recipe.output.name or Path(recipe.output.dir).name}

A {KIND_NAMES[a.type]} adapter for `{recipe.model.path}` ({family.spec.name}), trained with tuner.

- Trigger words: {", ".join(f"`{w}`" for w in triggers) or "none"}
- Rank {a.rank}, alpha {a.lora_alpha}{", DoRA" if a.dora else ""}; {steps} steps at lr {t.lr}
  ({t.optimizer}, {t.lr_scheduler}), batch {t.batch_size} x accumulation {t.grad_accum},
  mixed precision {t.mixed_precision}, resolution {recipe.data.resolution}
- The full resolved recipe is in `recipe.yaml`.{ema_line(recipe)}

## Samples (columns: adapter scale 0 = base model, then the trained adapter)

{grid_line}

## Use it

{diffusers_lines(recipe, family)}

tuner: `tuner sample {recipe.model.path} --lora {recipe.output.dir}:0.8 --prompt "..." --out DIR`

{comfy_lines(recipe, family)}
"""


KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def diffusers_lines(recipe, family) -> str:
    if recipe.adapter.type == "lora":
        return f"""diffusers:

```python
{load_snippet(recipe, family)}
pipe.load_lora_weights("{recipe.output.dir}")
```"""
    # diffusers' pipeline loaders read no LoHa, and LoKr for a few pipelines only.
    snippet = load_snippet(recipe, family)
    if not snippet.startswith("import tuner"):
        snippet = "import tuner\n" + snippet
    return f"""diffusers (its `load_lora_weights` does not read {KIND_NAMES[recipe.adapter.type]}
here; tuner adds it through peft):

```python
{snippet}
tuner.load_adapter(pipe, "{recipe.output.dir}", scale=1.0)
```"""


def ema_line(recipe) -> str:
    if recipe.train.ema is None:
        return ""
    return (
        f"\n- `pytorch_lora_weights_ema.safetensors` (+ `_ema_kohya`): the moving average of "
        f"the adapter (decay {recipe.train.ema.decay}), often smoother; the grid's `ema` column"
    )


def comfy_lines(recipe, family) -> str:
    """Which file to copy into ComfyUI (and webui front ends): the family's `comfy_file`,
    the one ComfyUI applies at the trained strength."""
    kohya = kohya_export_possible(recipe)
    if family.spec.export.comfy_file == "diffusers" or not kohya:
        name = lora.WEIGHT_NAME
    else:
        name = lora.KOHYA_WEIGHT_NAME
    line = (
        f"ComfyUI / A1111 / Forge: copy `{name}` into `models/loras/` and load it with a LoRA "
        "loader node (ComfyUI) or `<lora:NAME:0.8>` (A1111)."
    )
    if family.spec.export.comfy_file == "diffusers" and kohya:
        line += (
            f"\nThis one file loads at the trained strength in diffusers and ComfyUI alike; "
            f"`{lora.KOHYA_WEIGHT_NAME}` (kohya names, `.alpha` tensors) is for kohya-layout "
            f"tools and `tuner sample`: diffusers' {family.spec.pipeline} reads no kohya layout."
        )
    return line
