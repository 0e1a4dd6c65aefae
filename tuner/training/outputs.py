"""The output directory: guarded at the start, filled at the end."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tuner import files
from tuner.adapters import formats, lora
from tuner.adapters.metadata import training_metadata
from tuner.data.captions import tag_frequency
from tuner.errors import TunerError

log = logging.getLogger("tuner")
FINISHED = "tuner_finished.json"


def prepare_output_dir(recipe, output_dir: Path, resuming: bool) -> None:
    """Refuse to overwrite a finished run; check the folder is writable; save the recipe."""
    if (output_dir / FINISHED).is_file() and not (recipe.output.overwrite or resuming):
        raise TunerError(
            f"output.dir: {output_dir} holds a finished run; choose another "
            "output.dir, or set output.overwrite=true to replace it"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TunerError(
            f"output.dir: cannot write to {output_dir} ({exc.strerror or exc}); "
            "choose a writable folder"
        ) from None
    if "kohya" in recipe.output.formats and not kohya_export_possible(recipe):
        log.warning(
            "adapter.dora: the kohya file is skipped (DoRA has no kohya layout); the "
            "diffusers file loads in diffusers and ComfyUI"
        )
    (output_dir / FINISHED).unlink(missing_ok=True)
    write_text_atomic(output_dir / "recipe.yaml", recipe.to_yaml())


def kohya_export_possible(recipe) -> bool:
    """DoRA's magnitude vectors have no kohya/webui layout: such runs export diffusers only."""
    return "kohya" in recipe.output.formats and not recipe.adapter.dora


def write_text_atomic(path: Path, text: str) -> None:
    files.write_text(path, text)


def finish_outputs(
    recipe, output_dir: Path, family, comps, trained, accelerator, steps: int, report
) -> None:
    """Final adapter in every requested format, the final grid, the model card."""
    # Every file goes through tuner.files: a failed write is one files.WriteError and leaves no
    # partial file; run.py then keeps a checkpoint of the final weights (never lost).
    write_outputs(recipe, output_dir, family, comps, trained, accelerator, steps, report)


def write_outputs(
    recipe, output_dir: Path, family, comps, trained, accelerator, steps: int, report
) -> None:
    from tuner.inference.grids import training_grid

    meta = training_metadata(recipe, comps, steps, tag_frequency(report.captions))
    adapter_file = lora.save_adapter(output_dir, family, trained, extra_metadata=meta)
    if kohya_export_possible(recipe):
        state, file_meta = formats.read_adapter(adapter_file)
        kohya = formats.to_kohya(state, file_meta, family.spec.export.kohya_prefixes)
        formats.write_safetensors(kohya, output_dir / lora.KOHYA_WEIGHT_NAME, meta)
    if "diffusers" not in recipe.output.formats:
        adapter_file.unlink()
    grid = training_grid(recipe, output_dir, family, comps, steps, accelerator)
    write_text_atomic(output_dir / "README.md", model_card(recipe, family, steps, grid))
    write_text_atomic(output_dir / FINISHED, json.dumps({"steps": steps}))
    log.info("adapter saved to %s", output_dir)


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

A LoRA adapter for `{recipe.model.path}` ({family.spec.name}), trained with tuner.

- Trigger words: {", ".join(f"`{w}`" for w in triggers) or "none"}
- Rank {a.rank}, alpha {a.lora_alpha}{", DoRA" if a.dora else ""}; {steps} steps at lr {t.lr}
  ({t.optimizer}, {t.lr_scheduler}), batch {t.batch_size} x accumulation {t.grad_accum},
  mixed precision {t.mixed_precision}, resolution {recipe.data.resolution}
- The full resolved recipe is in `recipe.yaml`.

## Samples (columns: adapter scale 0 = base model, then the trained adapter)

{grid_line}

## Use it

diffusers:

```python
{load_snippet(recipe, family)}
pipe.load_lora_weights("{recipe.output.dir}")
```

tuner: `tuner sample {recipe.model.path} --lora {recipe.output.dir}:0.8 --prompt "..." --out DIR`

ComfyUI / A1111 / Forge: copy `pytorch_lora_weights_kohya.safetensors` into `models/loras/`
and load it with a LoRA loader node (ComfyUI) or `<lora:NAME:0.8>` (A1111).
"""
