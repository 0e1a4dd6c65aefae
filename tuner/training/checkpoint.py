"""Checkpoints: atomic folders `checkpoints/step-NNNNNN/`, retention, and finding `latest`.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete,
so `latest` never picks a half-written one, and an interrupted save loses nothing older.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tuner.errors import TunerError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "tuner_state.json"
LOOP_KEYS = ("step", "epoch", "position")  # the rest of tuner_state.json: run_id, recipe, data


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            return None  # nothing saved yet: start fresh, which is what the user meant
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise TunerError(
            f"train.resume: {resume} is not a complete tuner checkpoint folder; "
            "use 'latest' or a checkpoints/step-NNNNNN folder"
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def write_checkpoint(
    output_dir: Path, step: int, save_contents, state: dict, is_main: bool, keep: int
) -> Path:
    """save_contents(tmp_dir) writes everything; then the folder is published atomically."""
    root = Path(output_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        save_contents(tmp)
        if is_main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(output_dir, keep, state.get("run_id"))
    except OSError as exc:  # disk full, quota, permissions: earlier checkpoints stay intact
        shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(output_dir)
        kept = f"the last complete checkpoint is {previous[-1]}" if previous else "none saved yet"
        raise TunerError(
            f"could not save checkpoint {final.name} ({exc.strerror or exc}); "
            f"{kept}; free space and resume with train.resume=latest"
        ) from exc
    return final


def prune(output_dir: Path, keep: int, run_id: str | None = None) -> None:
    """Keep the run's newest `keep` checkpoints. Only the checkpoints of the run that writes
    (same run id; None: those that record none) are ever deleted."""
    own = [p for p in complete_checkpoints(output_dir) if _run_id_of(p) == run_id]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _run_id_of(folder: Path) -> str | None:
    try:
        return read_state(folder).get("run_id")
    except (OSError, ValueError):
        return "<unreadable>"  # never ours: left alone


def _fsync_tree(folder: Path) -> None:
    # Make the bytes durable before the rename publishes them (a crash right after a rename
    # must not leave a "complete" folder of empty files).
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


# --- what a checkpoint holds --------------------------------------------------------------


def save_training_state(run) -> Path:
    """LoRA weights (PEFT names, for resuming, and a diffusers-format adapter, for using),
    optimizer (8-bit states included), LR schedule, grad scaler and RNG states."""
    from safetensors.torch import save_file

    from tuner.adapters import lora

    accelerator = run.accelerator

    def contents(folder: Path) -> None:
        if accelerator.is_main_process:
            lora.save_adapter(folder, run.family, run.trained)
            weights = {
                f"{name}::{k}": v.detach().cpu().contiguous()
                for name, module in run.trained.items()
                for k, v in lora.peft_state(module).items()
            }
            save_file(weights, str(folder / "lora_state.safetensors"))
            scaler = accelerator.scaler.state_dict() if accelerator.scaler else None
            torch.save(
                {
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "rng": rng_state(),
                    "scaler": scaler,
                },
                folder / "training_state.pt",
            )
        accelerator.wait_for_everyone()

    final = write_checkpoint(
        run.output_dir,
        run.state["step"],
        contents,
        {**run.state, **run.record},  # where the loop is; the run id, recipe and data
        accelerator.is_main_process,
        run.recipe.output.keep,
    )
    accelerator.wait_for_everyone()
    return final


def load_training_state(folder: Path, run) -> dict:
    """Restore a checkpoint into the run's already-injected adapters; returns the loop state.

    The optimizer's hyperparameters come from the run's recipe, not the checkpoint: a resumed
    recipe's new lr, weight decay, betas or schedule take effect. The schedule is the new
    recipe's, continued at the checkpoint's step: lr = new base lr x schedule(step)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = load_file(str(folder / "lora_state.safetensors"))
    for name, module in run.trained.items():
        prefix = f"{name}::"
        weights = {k[len(prefix) :]: v for k, v in lora.items() if k.startswith(prefix)}
        # Loads into the adapter already injected: resuming never adds a second adapter.
        set_peft_model_state_dict(module, weights)
    # weights_only: a checkpoint path comes from the user, so nothing in it may run code.
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    recipe_groups = [
        {k: group[k] for k in ("initial_lr", "betas", "eps", "weight_decay") if k in group}
        for group in run.optimizer.param_groups
    ]
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    apply_recipe_schedule(run.optimizer, run.scheduler, recipe_groups)
    restore_rng_state(saved["rng"])
    if saved.get("scaler") and run.accelerator.scaler:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    state = read_state(folder)
    return {key: state[key] for key in LOOP_KEYS}


def apply_recipe_schedule(optimizer, scheduler, recipe_groups: list[dict]) -> None:
    """Put the recipe's hyperparameters back after loading a checkpoint (which restored its
    own): base lrs, betas, eps, weight decay; then the lr the schedule gives at the restored
    step (the lambdas are the new recipe's: load_state_dict keeps function lambdas)."""
    for group, values in zip(optimizer.param_groups, recipe_groups):
        group.update(values)
    if "initial_lr" not in recipe_groups[0] or not hasattr(scheduler, "lr_lambdas"):
        return  # not a LambdaLR (every diffusers schedule is one)
    scheduler.base_lrs = [values["initial_lr"] for values in recipe_groups]
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
